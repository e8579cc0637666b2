"""qloraner: QLoRA fine-tuning of LLaMA-architecture models for CoNLL-2003 NER."""

ENTITY_TYPES = ("LOC", "MISC", "ORG", "PER")


class QloranerError(Exception):
    """An error the user can fix; entry points print it on one line, without a traceback."""


def run_main(body) -> int:
    """An entry point's shell: a QloranerError becomes one `error: ...` line and exit code 2."""
    import sys

    from qloraner import dist

    try:
        return body()
    except QloranerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        dist.shutdown()
