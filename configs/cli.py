"""The command line's front door for the Hydra entry points (train.py, evaluate.py): a usage mistake ends
in one clear message (exit status 2) that names the valid choices, instead of Hydra's generic advice
("To append to your config use +modle=...") or a traceback.

    if __name__ == "__main__":
        cli.run(main, "train.yaml")

A mistyped group or option (``modle=...``, ``model=bert_encodr``), a key that the chosen option lacks
(``data.root=...`` while ``data=synthcxr``: the cohorts that have it are named) and a mistyped key get
close matches (difflib). Entry points raise ``UsageError`` for mistakes they find themselves (a missing
or nonexistent input file) and run their task inside ``with cli.usage_errors():``.

Inside the task, a *refusal* also ends in one line and exit status 2 (``refusal``): a UsageError, a
mandatory config value left unset (``data=mimic_cxr`` without ``data.root``), and a ValueError,
FileNotFoundError, KeyError or FileExistsError that a ``raise`` statement of this project raised on
purpose (the guards: a foreign checkpoint, a model that is not the one expected, a malformed cohort or
embeddings file), also when Hydra's ``instantiate`` wrapped it. Anything else is a bug and keeps its
traceback (exit status 1). ``HYDRA_FULL_ERROR=1`` shows the traceback of a refusal too.
"""

from __future__ import annotations

import contextlib
import difflib
import linecache
import os
import sys
import traceback
from pathlib import Path
from typing import Callable

import yaml

from cxr_relink.configs import CONFIG_DIR, compose

EXIT_USAGE = 2  # the conventional exit status of a command-line usage error (argparse's)
# Hydra flags that take a value (the value is not an override).
_FLAGS_WITH_VALUE = {"-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir", "-c", "--cfg",
                     "-p", "--package", "--info", "--experimental-rerun"}


_PROJECT = Path(__file__).resolve().parents[1]
# Whether the person asked for tracebacks (HYDRA_FULL_ERROR=1 in their environment); run() records it
# before it sets the variable for Hydra itself. None: read the environment.
_user_full_error: bool | None = None


class UsageError(ValueError):
    """A mistake in how the program was called (which inputs, which keys): printed as one line, exit
    status 2. A ValueError, so callers of the library functions may catch it as such."""


def run(main: Callable[[], object], config_name: str) -> None:
    """Call a ``@hydra.main`` function, turning usage mistakes into a clear message and exit status 2.
    Other errors keep their full traceback (exit status 1)."""
    from hydra.errors import ConfigCompositionException, OverrideParseException

    global _user_full_error
    # Hydra prints (and exits on) every exception itself unless HYDRA_FULL_ERROR is set; set, they
    # reach this function. A run's own errors (bugs) then show their whole traceback; refusals are
    # one line (usage_errors) unless the person set HYDRA_FULL_ERROR=1 themselves.
    _user_full_error = _wants_traceback()
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        main()
    except (ConfigCompositionException, OverrideParseException) as e:
        if _user_full_error:
            raise
        hydra_says = str(e) + (f"\n{e.__cause__}" if e.__cause__ is not None else "")
        try:
            why = explain(config_name, command_line_overrides(sys.argv[1:]))
        except Exception:  # the explanation must never hide the error itself
            why = None
        _exit_usage(why or hydra_says)


def _wants_traceback() -> bool:
    if _user_full_error is not None:
        return _user_full_error
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


@contextlib.contextmanager
def usage_errors():
    """Inside a Hydra task function: a refusal (``refusal``) becomes one line on stderr and exit status 2
    (a SystemExit passes through Hydra without its "Error executing job" preamble); other exceptions,
    and every exception under HYDRA_FULL_ERROR=1, keep their traceback."""
    try:
        yield
    except Exception as e:
        message = refusal(e)
        if message is None or _wants_traceback():
            raise
        _exit_usage(message)


_REFUSALS = (ValueError, FileNotFoundError, FileExistsError, KeyError)


def _raised_on_purpose(e: BaseException) -> bool:
    """Whether ``e`` left a ``raise`` statement in this project's own code (not an error of a library,
    nor one Python raised for a statement that went wrong: ``d[k]``, ``int(s)``)."""
    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return False
    last = frames[-1]
    path = Path(last.filename).resolve()
    if _PROJECT not in path.parents or "site-packages" in path.parts or ".venv" in path.parts:
        return False
    end = getattr(last, "end_lineno", None) or last.lineno
    statement = " ".join(linecache.getline(last.filename, n).strip() for n in range(last.lineno, end + 1))
    return statement.startswith("raise ")


def refusal(e: BaseException) -> str | None:
    """The one-line message of an exception that refuses the run's input, or None for a bug (module
    docstring). Hydra's InstantiationException is looked through to what the constructor raised."""
    from hydra.errors import InstantiationException
    from omegaconf.errors import MissingMandatoryValue

    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, UsageError):
            return str(e)
        if isinstance(e, MissingMandatoryValue):
            key = getattr(e, "full_key", None) or str(e).split(":", 1)[-1].strip().splitlines()[0]
            return (f"{key} is not set (the config leaves it '???'; there is no default): give it on the command "
                    f"line, {key}=<value>")
        if isinstance(e, _REFUSALS) and _raised_on_purpose(e):
            text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
            return " ".join(text.split()) or type(e).__name__
        e = e.__cause__ if isinstance(e, InstantiationException) else None
    return None


def _exit_usage(message: str) -> None:
    sys.stderr.write(f"Error: {message}\n")
    raise SystemExit(EXIT_USAGE)


def command_line_overrides(argv: list[str]) -> list[str]:
    """The ``key=value`` overrides of a command line (flags and their values left out)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg in _FLAGS_WITH_VALUE
        elif "=" in arg:
            out.append(arg)
    return out


def config_groups(config_name: str) -> dict[str, list[str]]:
    """The config groups an entry point composes (its defaults list, and the groups nested in them,
    e.g. model/text_tower) with their options: {"model": ["bert_encoder", ...], ...}."""
    primary = yaml.safe_load((CONFIG_DIR / config_name).read_text()) or {}
    top = [next(iter(d)) for d in primary.get("defaults", []) if isinstance(d, dict)]
    groups = {}
    for name in top:
        for folder in [CONFIG_DIR / name, *sorted(p for p in (CONFIG_DIR / name).rglob("*") if p.is_dir())]:
            options = sorted(p.stem for p in folder.glob("*.yaml"))
            if options:
                groups[folder.relative_to(CONFIG_DIR).as_posix()] = options
    return groups


def _close(word: str, candidates, n: int = 3) -> list[str]:
    return difflib.get_close_matches(word, sorted(set(candidates)), n=n, cutoff=0.6)


def _mean(close: list[str], fmt: str = "{}") -> str:
    return f" Did you mean {' or '.join(fmt.format(c) for c in close)}?" if close else ""


def _has_key(cfg, key: str) -> bool:
    node = cfg
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node.keys():
            return False
        node = node._get_node(part)
    return True


def _keys_at(cfg, parent: str) -> list[str]:
    node = cfg
    for part in [p for p in parent.split(".") if p]:
        node = node._get_node(part)
    return list(node.keys()) if hasattr(node, "keys") else []


def explain(config_name: str, overrides: list[str]) -> str | None:
    """What is wrong with ``overrides`` for ``configs/<config_name>``, naming the valid choices; None
    if nothing is found (the caller then shows Hydra's own message)."""
    groups = config_groups(config_name)
    program = {"train.yaml": "train.py", "evaluate.yaml": "evaluate.py"}.get(config_name, config_name)
    choices: list[str] = []  # the group choices of the command line, kept to compose what it picks
    for ov in overrides:
        key, value = ov.split("=", 1)
        key = key.lstrip("+~")
        if key in groups:
            for v in value.split(","):  # (multirun: model=a,b)
                if v not in groups[key] and v != "null":
                    return (f"{key}={v}: no such option in configs/{key}/.{_mean(_close(v, groups[key]))} "
                            f"Options: {', '.join(groups[key])}.")
            choices.append(f"{key}={value.split(',')[0]}")
    try:
        cfg = compose(config_name, choices)
    except Exception:
        return None
    for ov in overrides:
        key = ov.split("=", 1)[0]
        if key.startswith(("+", "~")) or key.startswith("hydra") or key in groups or _has_key(cfg, key):
            continue
        head, _, rest = key.partition(".")
        parent = key.rpartition(".")[0]
        if not rest:  # an unknown top-level name: a mistyped group or key?
            close = _close(key, list(groups) + list(cfg.keys()))
            return (f"{ov}: {key!r} is neither a config group nor a key of {config_name}.{_mean(close)} "
                    f"Groups: {', '.join(g for g in groups if '/' not in g)}. To add a new key: +{ov}")
        if head in groups and _has_key(cfg, head):
            current = next((c.split("=", 1)[1] for c in choices if c.startswith(head + "=")), None) or \
                _default_choice(config_name, head)
            having = [o for o in groups[head]
                      if o != current and _composes_with_key(config_name, choices, head, o, key)]
            if having:
                return (f"{key}: the {head}={current} option has no such key; "
                        f"{', '.join(f'{head}={o}' for o in having)} {'has' if len(having) == 1 else 'have'} it. "
                        f"Choose one on the command line, e.g. python {program} {head}={having[0]} {ov}")
        if _has_key(cfg, parent):
            close = _close(key.rpartition(".")[2], _keys_at(cfg, parent))
            return (f"{ov}: {parent} has no key {key.rpartition('.')[2]!r}.{_mean(close, parent + '.{}')} "
                    f"Keys of {parent}: {', '.join(map(str, _keys_at(cfg, parent)))}")
        return f"{ov}: {config_name} has no key {parent!r}"
    return None


def _default_choice(config_name: str, group: str) -> str | None:
    primary = yaml.safe_load((CONFIG_DIR / config_name).read_text()) or {}
    return next((d[group] for d in primary.get("defaults", []) if isinstance(d, dict) and group in d), None)


def _composes_with_key(config_name: str, choices: list[str], group: str, option: str, key: str) -> bool:
    others = [c for c in choices if not c.startswith(group + "=")]
    try:
        return _has_key(compose(config_name, [*others, f"{group}={option}"]), key)
    except Exception:  # an option that cannot compose here (it needs other settings) does not count
        return False

