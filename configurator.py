"""
nanoGPT's configurator, as a function. A script keeps its defaults as commented module globals and, only under
`if __name__ == "__main__":`, calls

    config = configure(defaults, sys.argv[1:])

with `defaults` a dict of those globals. Arguments are either a config file (`config/tiny.py`: plain assignments,
executed) or `--key=value` overrides, applied left to right. Fixed against nanoGPT's version:
- an int is accepted for a float key (`--beta=0`), a bool is written True/False/true/false/1/0;
- `--key=a=b` splits on the first `=`;
- unknown keys are rejected, from files and the CLI alike, with the list of valid keys;
- a config path is tried as given, then relative to this repository (so `config/tiny.py` works from any directory).
`print_config` / `save_config` mask secrets, so an API key never reaches a log or a config dump.

The bottom of the file holds the other half of every script's I/O contract (shared/DESIGN.md, reliability): outputs
are append-only JSONL, flushed per record, that a rerun reads back to skip finished ids, tolerating the torn last
line a kill leaves (`repair_tail`, `iter_jsonl`, `read_jsonl`, `stable_hash`). They live here, beside the config
dump, so that each script imports one small helper module and no script imports another.
"""
import ast
import hashlib
import json
import os
import re

REPO = os.path.dirname(os.path.abspath(__file__))
# names that hold credentials: api_key, openai_key, hf_token, secret, password (not max_new_tokens or key_frames)
SECRET_NAME = re.compile(r"(^|_)(api_?key|key|token|secret|password)$", re.IGNORECASE)


def _coerce(key, value, default):
    """Bring `value` (already a Python object) to the type of `default`, or raise ValueError."""
    if default is None or value is None:
        return value  # None means "unset": any type is accepted
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, str):
        return value if isinstance(value, str) else str(value)
    elif isinstance(value, type(default)):
        return value
    raise ValueError(f"config key {key!r} expects {type(default).__name__} (default {default!r}), got {value!r}")


def _parse_cli_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string: --out=runs/a


def resolve_path(path):
    """A config file path as given if it exists, else relative to the repository root."""
    if os.path.exists(path):
        return path
    candidate = os.path.join(REPO, path)
    if os.path.exists(candidate):
        return candidate
    raise FileNotFoundError(f"config file {path!r} not found (also looked in {REPO})")


def configure(defaults, argv):
    """Return a new dict: `defaults` updated by the config files and --key=value overrides in `argv`."""
    config = dict(defaults)

    def set_key(key, value, source):
        if key not in config:
            valid = ", ".join(sorted(config))
            raise ValueError(f"unknown config key {key!r} in {source}; valid keys: {valid}")
        config[key] = _coerce(key, value, defaults[key])

    for arg in argv:
        if arg.startswith("--"):
            if "=" not in arg:
                raise ValueError(f"argument {arg!r} must look like --key=value")
            key, text = arg[2:].split("=", 1)
            set_key(key, _parse_cli_value(text), "the command line")
        else:
            path = resolve_path(arg)
            namespace = {}
            with open(path) as f:
                exec(compile(f.read(), path, "exec"), namespace)
            for key, value in namespace.items():
                if key.startswith("_") or key == "__builtins__" or callable(value) or isinstance(value, type(os)):
                    continue  # helpers a config file may define or import (math, functions)
                set_key(key, value, path)
    return config


def is_secret(key):
    return bool(SECRET_NAME.search(key))


def masked(config):
    return {k: ("***" if is_secret(k) and v else v) for k, v in config.items()}


def print_config(config):
    for key, value in sorted(masked(config).items()):
        print(f"  {key} = {value!r}")


def save_config(config, path):
    """Write the resolved config (secrets masked) as JSON beside a script's output; atomic."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(masked(config), f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# outputs: append-only JSONL that survives a kill


def repair_tail(path):
    """Truncate a torn last line (a kill mid-write) so appends start on a fresh line. Reads only the file's tail."""
    if not path or not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        end = pos = f.seek(0, os.SEEK_END)
        while pos > 0:
            step = min(pos, 1 << 16)
            f.seek(pos - step)
            chunk = f.read(step)
            if pos == end and chunk.endswith(b"\n"):
                return  # intact
            k = chunk.rfind(b"\n")
            if k >= 0:
                f.truncate(pos - step + k + 1)
                return
            pos -= step
        f.truncate(0)  # a single torn line and nothing else


def iter_jsonl(path, required=()):
    """Records of a JSONL file, streamed. An unparseable unterminated last line (torn by a kill) is skipped; any other
    bad line, or a record lacking a `required` field, is an error naming the file and line."""
    if not path or not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                if not line.endswith("\n"):
                    return  # the last line, torn
                raise ValueError(f"{path}:{i + 1} is not valid JSON; fix or remove that line")
            missing = [k for k in required if not isinstance(rec, dict) or k not in rec]
            if missing:
                raise ValueError(f"{path}:{i + 1} lacks required fields {missing}")
            yield rec


def read_jsonl(path, required=()):
    return list(iter_jsonl(path, required))


def stable_hash(*parts):
    """A hex digest that is the same in every process and run (Python's hash() is salted per process)."""
    return hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()
