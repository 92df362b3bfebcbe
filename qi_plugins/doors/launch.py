"""``qi generate --nproc N [--cfg-parallel C] [--ulysses U | --ring R]``: the command starts its own workers
with torch's launcher (the elastic agent of ``torch.distributed.run``, one node, no restarts) and runs the same
``qi generate`` in each with the ``parallel`` step runner. Rank 0 writes the image. A worker that fails stops the
others; the launcher exits with that worker's first error line; Ctrl-C stops every worker and exits 130. Several
nodes: ``torchrun`` with its rendezvous (docs/parallel.md), where ``--cfg-parallel`` / ``--ulysses`` / ``--ring``
set the degrees."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from qi_core.errors import InvalidInputError, QiError

# what the parallel runner reads; the launcher's own flags (the workers do not get them)
CFG_ENV, ULYSSES_ENV, RING_ENV = "QI_PARALLEL_CFG", "QI_PARALLEL_ULYSSES", "QI_PARALLEL_RING"
FLAGS = ("--nproc", "--cfg-parallel", "--ulysses", "--ring")
ERROR_PREFIX = "qi: error: "


class WorkerFailedError(QiError):
    """A worker process of ``--nproc`` failed (an error, a crash or a signal); the others were stopped."""


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=int, default=None, metavar="N",
                        help="processes on this machine: starts N workers with torch's launcher and the parallel "
                        "step runner (--seed required; default 1, or C×U×R)")  # fmt: skip
    parser.add_argument("--cfg-parallel", type=int, default=None, metavar="C",
                        help="CFG-parallel degree: the guidance sides on C process groups")  # fmt: skip
    parser.add_argument("--ulysses", type=int, default=None, metavar="U",
                        help="Ulysses degree: each input's tokens split over U processes")  # fmt: skip
    parser.add_argument("--ring", type=int, default=None, metavar="R",
                        help="ring-attention degree: each input's tokens split over R processes, every head on "
                        "each (any head count; not with --ulysses)")  # fmt: skip


def inside_launcher() -> bool:
    return "RANK" in os.environ or "LOCAL_RANK" in os.environ


def degrees(args: argparse.Namespace) -> tuple[int, int, int, int]:
    """(processes, cfg, ulysses, ring) of ``--nproc`` / ``--cfg-parallel`` / ``--ulysses`` / ``--ring``; checked
    before anything starts. Ring is 1 unless given (then a missing Ulysses degree is 1); one of cfg and ulysses
    missing is what the processes leave for it; none: cfg 2 on an even count, the rest Ulysses."""
    n, c, u, r = args.nproc, args.cfg_parallel, args.ulysses, getattr(args, "ring", None)
    for value, flag in ((n, "--nproc"), (c, "--cfg-parallel"), (u, "--ulysses"), (r, "--ring")):
        if value is not None and value < 1:
            raise InvalidInputError(f"{flag} must be a positive integer, got {value}")
    if (u or 1) > 1 and (r or 1) > 1:
        raise InvalidInputError("--ulysses and --ring do not combine: split the sequence with one of them")
    r = r or 1
    if r > 1 and u is None:
        u = 1
    if n is None:
        n = (c or 1) * (u or 1) * r
    if n % r:
        raise InvalidInputError(f"--ring {r} must divide --nproc {n}: the degrees' product is the processes")
    m = n // r  # the processes ring leaves to cfg × ulysses
    if c is None and u is None:
        c = 2 if m % 2 == 0 else 1
    if c is None:
        c = m // u if m % u == 0 else 0
    if u is None:
        u = m // c if m % c == 0 else 0
    if not c or not u:
        flag, value = ("--cfg-parallel", c) if args.cfg_parallel is not None else ("--ulysses", u)
        value = args.cfg_parallel if args.cfg_parallel is not None else args.ulysses
        raise InvalidInputError(
            f"{flag} {value} must divide --nproc {n}: the degrees' product is the processes"
        )
    if c * u * r != n:
        product = f"--cfg-parallel {c} × " + (f"--ring {r}" if r > 1 else f"--ulysses {u}")
        raise InvalidInputError(
            f"{product} = {c * u * r} must equal --nproc {n} (the processes on this machine)"
        )
    return n, c, u, r


def prepare(args: argparse.Namespace) -> int:
    """Check the launcher flags and return the number of processes the run will have (1: no launcher).

    Inside a launcher (torchrun), ``--cfg-parallel`` / ``--ulysses`` / ``--ring`` only set the parallel runner's
    degrees."""
    ring = getattr(args, "ring", None)
    given = any(v is not None for v in (args.nproc, args.cfg_parallel, args.ulysses, ring))
    if not given:
        return int(os.environ.get("WORLD_SIZE", "1"))
    if inside_launcher():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        for value, env in ((args.cfg_parallel, CFG_ENV), (args.ulysses, ULYSSES_ENV), (ring, RING_ENV)):
            if value is not None:
                if value < 1:
                    raise InvalidInputError(f"degrees must be positive integers, got {value}")
                os.environ[env] = str(value)
        args.step_runner = args.step_runner or "parallel"
        return world
    n, c, u, r = degrees(args)
    if n > 1:
        if args.step_runner not in (None, "parallel"):
            raise InvalidInputError(
                f"--nproc runs the parallel step runner; --step-runner {args.step_runner} cannot be combined "
                "with it (leave --step-runner out)"
            )
        from qi_core.plugin_host import host

        if host().pm.get_plugin("parallel") is None:
            raise InvalidInputError("--nproc needs the parallel plugin, which is disabled or not installed")
        args.launch_degrees = (n, c, u, r)
    return n


def wanted(args: argparse.Namespace) -> bool:
    """Whether this process starts the workers (``prepare`` found more than one process, outside a launcher)."""
    return getattr(args, "launch_degrees", None) is not None and not inside_launcher()


def worker_argv(argv: list[str]) -> list[str]:
    """``argv`` of ``qi generate`` without the launcher flags (also abbreviated or ``--flag=N``), with
    ``--step-runner parallel``."""
    out: list[str] = []
    skip = False
    for k, token in enumerate(argv):
        if skip:
            skip = False
            continue
        if token == "--":  # the rest are positionals
            out += argv[k:]
            break
        name = token.split("=", 1)[0]
        if len(name) > 2 and name.startswith("--") and any(f.startswith(name) for f in FLAGS):
            skip = "=" not in token
            continue
        out.append(token)
    if not any(t == "--step-runner" or t.startswith("--step-runner=") for t in out):
        out = ["--step-runner", "parallel", *out]
    return out


def _own_argv(args: argparse.Namespace) -> list[str]:
    argv = getattr(args, "command_argv", None)
    if argv is not None:
        return list(argv)
    rest = sys.argv[1:]  # `qi generate ARGS`: the arguments after the command name
    return rest[rest.index("generate") + 1 :] if "generate" in rest else rest


def launch(args: argparse.Namespace) -> int:
    """Run ``qi generate`` on ``--nproc`` workers through torch's elastic launcher; returns the exit code."""
    import logging
    import shutil
    import signal
    import tempfile
    import uuid

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    n, c, u, r = args.launch_degrees
    log_dir = tempfile.mkdtemp(prefix="qi-launch-")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=n,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",  # a free port on this machine
        max_restarts=0,  # a failed worker ends the run: the agent stops the others
        monitor_interval=0.1,
        logs_specs=DefaultLogsSpecs(log_dir=log_dir, redirects=Std.ERR),  # each rank's stderr to a file
        shutdown_timeout=5,  # SIGKILL what has not stopped 5 s after the stop signal
    )
    command = [sys.executable, "-m", "qi_core.cli", "generate", *worker_argv(_own_argv(args))]
    saved_env = {k: os.environ.get(k) for k in (CFG_ENV, ULYSSES_ENV, RING_ENV, "OMP_NUM_THREADS")}
    saved_signals = {
        s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
    }
    quiet = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
             if name.startswith("torch.distributed.elastic")]  # fmt: skip
    levels = [logger.level for logger in quiet]
    os.environ[CFG_ENV], os.environ[ULYSSES_ENV], os.environ[RING_ENV] = str(c), str(u), str(r)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))  # torchrun's default: 1
    for logger in quiet:  # the agent's notices; the outcome is reported below
        logger.setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, entrypoint=command[0])(*command[1:])
        return 0
    except ChildFailedError as e:
        raise WorkerFailedError(_first_error(e.failures, log_dir)) from None
    except SignalException as e:
        if e.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None  # `qi: interrupted`, exit 130
        print(f"qi: stopped by {signal.Signals(e.sigval).name}", file=sys.stderr)
        return 128 + int(e.sigval)
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
        for s, handler in saved_signals.items():
            signal.signal(s, handler)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(log_dir, ignore_errors=True)


def _stderr_of(log_dir: str, failure: Any) -> list[str]:
    """The lines a failed worker wrote to stderr (``LOG_DIR/RUN_ID/attempt_0/LOCAL_RANK/stderr.log``)."""
    lines: list[str] = []
    for path in sorted(Path(log_dir).glob(f"*/attempt_*/{failure.local_rank}/stderr.log")):
        try:
            lines += path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            pass
    return lines


def _first_error(failures: dict[int, Any], log_dir: str) -> str:
    import signal

    """What the first failed worker said: its ``qi: error:`` line, else how it ended and its last line.
    Root causes go first (an error of its own, a kill from outside), then crashes (a collective that broke
    because a peer went away), then the workers the agent stopped; the time breaks ties."""

    def cause(item: tuple[int, Any]) -> tuple[int, int, int]:
        rank, f = item
        if any(line.startswith(ERROR_PREFIX) for line in _stderr_of(log_dir, f)):
            kind = 0  # an error of its own
        elif f.exitcode < 0 and -f.exitcode not in (signal.SIGTERM, signal.SIGINT):
            kind = 1  # killed from outside (SIGKILL, SIGSEGV …)
        else:
            kind = 2 if f.exitcode > 0 else 3  # a crash; last: stopped by the agent after another failed
        return kind, f.timestamp, rank

    rank, failure = min(failures.items(), key=cause)
    lines = _stderr_of(log_dir, failure)
    said = next((line[len(ERROR_PREFIX) :] for line in lines if line.startswith(ERROR_PREFIX)), None)
    if said is not None:
        return f"rank {rank}: {said}"
    if failure.exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-failure.exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-failure.exitcode}"
    else:
        how = f"exited with code {failure.exitcode}"
    last = next((line.strip() for line in reversed(lines) if line.strip()), "")
    return (
        f"rank {rank} (pid {failure.pid}) {how}"
        + (f": {last}" if last else "")
        + "; the other workers were stopped"
    )
