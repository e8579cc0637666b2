"""qloraner: QLoRA fine-tuning of LLaMA-architecture models for named-entity recognition (CoNLL-2003 by default)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the project folder: recipes/, datasets/, outputs/, .cache/
ENTITY_TYPES = ("LOC", "MISC", "ORG", "PER")


EXIT_INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C


class QloranerError(Exception):
    """An error the user can fix; entry points print it on one line, without a traceback."""


def first_line(err: Exception) -> str:
    """An exception's first line, cut to a readable length (its type where it has no message)."""
    return str(err).splitlines()[0][:160] if str(err).strip() else type(err).__name__


def refuse_empty(value, flag: str):
    """`value`, unless it is an empty path (an unset shell variable, say): Path("") is the current folder, and an
    empty flag must not mean that, the project folder or the default."""
    if value is not None and not str(value).strip():
        raise QloranerError(f"{flag}: empty; give a path")
    return value


def make_dir(path, flag: str = "--output-dir"):
    """Create the folder `path` (with its parents) and check that files can be written in it, or say in one line
    why not."""
    import tempfile

    path = Path(refuse_empty(path, flag))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise QloranerError(f"{flag} {path}: a file is in the way; give a folder") from None
    except OSError as err:
        raise QloranerError(f"{flag} {path}: cannot create it ({err.strerror})") from None
    # An existing folder may not take files (read-only, another user's); root passes every access() check, so try
    # a file rather than ask, before any model loads.
    try:
        tempfile.TemporaryFile(dir=path).close()
    except OSError as err:
        raise QloranerError(f"{flag} {path}: cannot write in it ({err.strerror}); give another folder") from None
    return path


def run_main(body) -> int:
    """An entry point's shell: a QloranerError becomes one `error: ...` line and exit code 2; Ctrl-C one line and
    exit code 130."""
    import sys

    try:
        return body()
    except QloranerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if dist := sys.modules.get("qloraner.dist"):  # a command that ended before torch loaded has none to shut down
            dist.shutdown()


def __getattr__(name: str):
    """`from qloraner import Tagger` (qloraner.tag), imported on first use: the other entry points don't pay for it."""
    if name == "Tagger":
        from qloraner.tag import Tagger

        return Tagger
    raise AttributeError(f"module 'qloraner' has no attribute {name!r}")
