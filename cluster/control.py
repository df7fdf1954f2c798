"""The job's control channel: a small named actor through which `relayrl scale` and `relayrl status`
talk to a running job from another process.

The driver owns it (it dies with the job), publishes a status snapshot into it every step, and
polls it for scale requests between its own calls, so a request never races a step in flight.
"""

from __future__ import annotations

NAMESPACE = "relayrl"
CONTROL_NAME = "relayrl-control"


class Control:
    def __init__(self):
        self._generators: int | None = None
        self._stop = False
        self._status: dict = {}

    def request_generators(self, n: int) -> int:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"generators: need an integer >= 1, got {n!r}")
        self._generators = n
        return n

    def request_stop(self) -> bool:
        """Finish the current step, save the model and summary, and end the job early."""
        self._stop = True
        return True

    def take_requests(self) -> dict:
        """{'generators': n or None, 'stop': bool}; a generators request is handed out once."""
        req = {"generators": self._generators, "stop": self._stop}
        self._generators = None
        return req

    def publish_status(self, status: dict) -> None:
        self._status = status

    def status(self) -> dict:
        return self._status


def client_auth_env() -> None:
    """Ray turns token authentication on for clusters it starts (shared/FACTS.md), but a client given an
    explicit address only sends the token (from RAY_AUTH_TOKEN or ~/.ray/auth_token) when RAY_AUTH_MODE
    says auth is on, and Ray reads that when it is first imported: call this before `import ray`.
    RAY_AUTH_MODE=disabled in the environment still wins; the token never goes on a command line."""
    import os

    os.environ.setdefault("RAY_AUTH_MODE", "token")


def start_control():
    """Create the control actor for this job (fails if another job in this namespace holds the name)."""
    import ray

    return ray.remote(Control).options(name=CONTROL_NAME, namespace=NAMESPACE, num_cpus=0,
                                       max_restarts=0).remote()


def find_control(address: str, timeout_s: float = 30.0):
    """Connect to the cluster at `address` and return the running job's control actor."""
    import socket

    import ray

    if address in ("auto", ""):  # what ray.init(address="auto") would pick, resolved here to check it first
        import os

        current = "/tmp/ray/ray_current_cluster"
        address = os.environ.get("RAY_ADDRESS") or (open(current).read().strip() if os.path.exists(current) else "")
        if not address:
            raise RuntimeError("no Ray cluster found on this machine; pass --address HOST:PORT")
    if not address.startswith(("ray://", "http://", "https://")):
        # ray.init retries an unreachable address for minutes; a closed port should fail at once
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=timeout_s).close()
        except (OSError, ValueError) as e:
            raise RuntimeError(f"cannot reach a Ray cluster at {address!r}: {e}") from None
    if not ray.is_initialized():
        client_auth_env()
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    try:
        return ray.get_actor(CONTROL_NAME, namespace=NAMESPACE)
    except ValueError:
        raise RuntimeError(f"no running relayrl job found on the Ray cluster at {address!r} "
                           f"(no actor named {CONTROL_NAME!r} in namespace {NAMESPACE!r})") from None
