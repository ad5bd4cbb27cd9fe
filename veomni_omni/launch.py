"""Scripts on several CPU (gloo) ranks under torchrun that never hang: the multi-rank benchmarks and tests."""

from __future__ import annotations


def run_ranks(
    script: str, world_size: int, args: list[str], timeout_s: float, native_abort_retries: int = 1, torchrun_args: tuple[str, ...] = ()
) -> str:
    """Run `script` under torchrun on CPU/gloo with `world_size` ranks; return its output.

    Fails with the ranks' tracebacks if any rank fails, and kills the whole group (never hangs) if it
    has not finished within `timeout_s`. A rank dying in native code with no Python exception
    ("terminate called ...", seen rarely from gloo under heavy CPU contention) is retried
    `native_abort_retries` times with a warning; a deterministic crash still fails. `torchrun_args`:
    more torchrun options (e.g. `--max-restarts=1`).
    """
    import os
    import signal
    import subprocess
    import sys
    import warnings

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}", *torchrun_args, script, *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise TimeoutError(
            f"{world_size}-rank run of {script} did not finish within {timeout_s:.0f} s (a rank is probably stuck "
            f"in a collective). Last output:\n{output[-4000:]}"
        )
    if proc.returncode != 0:
        # torchrun prefixes each rank's traceback with "[rankN]:"; show those rather than log noise.
        tracebacks = "\n".join(line for line in output.splitlines() if line.startswith("[rank"))
        if not tracebacks and "terminate called" in output and native_abort_retries > 0:
            warnings.warn(f"a rank of {script} aborted in native code without a Python error; retrying once")
            return run_ranks(script, world_size, args, timeout_s, native_abort_retries - 1, torchrun_args)
        raise RuntimeError(f"{world_size}-rank run of {script} failed (exit {proc.returncode}):\n{(tracebacks or output)[-6000:]}")
    return output
