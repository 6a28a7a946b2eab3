"""A built-in text corpus that needs no download: the documentation strings of Python's own standard library.

Used by `slimtune demo` and the tests, so a fresh machine with no network can train a model end to end.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from pathlib import Path

# Well-documented, side-effect-free modules present in every CPython.
MODULES = (
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "fnmatch", "fractions",
    "functools", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "inspect", "io",
    "ipaddress", "itertools", "json", "logging", "lzma", "mailbox", "math", "mimetypes", "numbers",
    "operator", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched", "secrets", "shlex",
    "shutil", "socket", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "traceback", "typing", "unittest", "urllib.parse", "uuid", "warnings",
    "weakref", "zipfile",
)


def python_docs_text(max_chars: int | None = None) -> str:
    """Concatenated docstrings of the modules above and their public classes and functions (about 1-2 MB)."""
    parts: list[str] = []
    seen: set[int] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            for obj in [module] + [v for k, v in sorted(vars(module).items()) if not k.startswith("_")]:
                if id(obj) in seen or not (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj)):
                    continue
                seen.add(id(obj))
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 80:
                    parts.append(doc.strip() + "\n\n")
    text = "".join(parts)
    return text[:max_chars] if max_chars else text


def write_python_docs(path: str | Path, max_chars: int | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(python_docs_text(max_chars), encoding="utf-8")
    return path
