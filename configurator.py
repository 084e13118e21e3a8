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

`main` is the skeleton every script and importer runs under `if __name__ == "__main__":`, so they all behave alike:
DEFAULTS -> configure -> print (secrets masked) -> save config -> run -> summary -> exit code, with the exit codes
below (the README's troubleshooting table lists them).
"""
import ast
import os
import re
import sys
import time

from records import write_json

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
    write_json(path, dict(sorted(masked(config).items())))


def repo_path(path):
    """A data path from a config (data/taxonomy.json, data/prompts): as given if it exists, else relative to this
    repository, so scripts run from any directory."""
    if not path or os.path.exists(path) or os.path.isabs(path):
        return path
    candidate = os.path.join(REPO, path)
    return candidate if os.path.exists(candidate) else path


# -----------------------------------------------------------------------------
# the script skeleton

EXIT_OK = 0  # everything asked was done (items recorded as permanently bad, e.g. a corrupt video, count as done)
EXIT_CRASH = 1  # an unexpected exception (a bug): Python's traceback
EXIT_CONFIG = 2  # a configuration, input or credential error, found before the work it would spoil: fix, rerun
EXIT_INCOMPLETE = 3  # items are left for a rerun (endpoint failures, a preempted run): rerun the same command


def defaults_of(namespace):
    """A script's DEFAULTS: its lower-case module globals of a config type (the commented block at its top)."""
    return {k: v for k, v in namespace.items() if not k.startswith("_") and k.islower()
            and isinstance(v, (int, float, bool, str))}


def main(name, defaults, run, argv, paths):
    """Configure, print and save the config, run, write the summary, return the exit code. `run(config)` returns the
    summary dict, with "status" "done" or "incomplete" (items left for a rerun), or None on ranks other than 0;
    `paths(config)` -> (config path, summary path) (None: not written). Errors a user can cause (ValueError,
    FileNotFoundError, or any exception with an `exit_code` attribute, e.g. llm's credential errors) end in one line
    on stderr, the summary saying so, and their code; anything else is a bug and keeps its traceback."""
    master = int(os.environ.get("RANK", 0)) == 0
    try:
        config = configure(defaults, argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    config_path, summary_path = paths(config)
    if master:
        print(f"{name} config:")
        print_config(config)
        if config_path:
            save_config(config, config_path)
    failed = True
    try:
        summary = run(config)
        code = EXIT_OK if summary is None or summary.get("status", "done") == "done" else EXIT_INCOMPLETE
        failed = False
    except Exception as e:
        code = getattr(e, "exit_code", EXIT_CONFIG if isinstance(e, (ValueError, FileNotFoundError)) else None)
        if code is None:
            raise
        print(f"error: {e}", file=sys.stderr)
        summary = dict(status="config_error" if code == EXIT_CONFIG else "incomplete", error=str(e))
    finally:
        distributed = _teardown_distributed(failed)
    if master and summary is not None and summary_path:
        write_json(summary_path, dict(summary, exit_code=code))
    if master and code:
        print(f"{name}: exit code {code} ({'work left for a rerun' if code == EXIT_INCOMPLETE else 'not run'})")
    if distributed:
        # every output is written: leave now. Interpreter shutdown after a gloo process group can abort a rank in a
        # C++ destructor ("terminate called without an active exception": 1 of ~15 FSDP2 test runs on a loaded
        # 2-core machine), which would turn a finished run into a failed torchrun
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


class Progress:
    """Progress with rate and ETA on rank 0: a tqdm bar on a terminal, one line per `every` seconds in a log."""

    def __init__(self, name, total, unit, enabled=True, every=30.0):
        self.name, self.total, self.unit, self.every, self.done = name, total, unit, every, 0
        self.bar, self.on = None, enabled
        self.t0 = self.last = time.time()
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit=unit, desc=name, dynamic_ncols=True)

    def update(self, n=1, note=""):
        """`note`: extra state for the line (e.g. "$0.12 so far")."""
        self.done = min(self.total, self.done + n)
        if self.bar is not None:
            self.bar.update(n)
            if note:
                self.bar.set_postfix_str(note, refresh=False)
        elif self.on and time.time() - self.last >= self.every:
            self.last, dt = time.time(), time.time() - self.t0
            rate = self.done / max(dt, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            print(f"{self.name}: {self.done}/{self.total} {self.unit}, {rate:.2f} {self.unit}/s, ETA {eta / 60:.1f} "
                  f"min{', ' + note if note else ''}", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _teardown_distributed(failed):
    """Under torchrun: ranks meet before gloo/NCCL goes down (a peer still talking to it aborts otherwise). Returns
    whether there was a process group."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        if not failed:
            dist.barrier()
        dist.destroy_process_group()
        return True
    return False
