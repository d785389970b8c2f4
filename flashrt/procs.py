"""Process liveness, for the leftovers (temp dirs, locks) a dead process may leave behind."""
import os


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists (one we may not signal still exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
