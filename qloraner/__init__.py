"""qloraner: QLoRA fine-tuning of LLaMA-architecture models for CoNLL-2003 NER."""

ENTITY_TYPES = ("LOC", "MISC", "ORG", "PER")


class QloranerError(Exception):
    """An error the user can fix; entry points print it on one line, without a traceback."""
