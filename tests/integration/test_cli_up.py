import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def start_up(tmp_path, port: int) -> subprocess.Popen:
    """`scratchllm up` started in tmp_path (where a .env file may wait); what it prints goes to tmp_path/up.out."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCRATCHLLM_")}
    env["SCRATCHLLM_WORKER_SOFT_SHUTDOWN_S"] = "5"
    with open(tmp_path / "up.out", "w") as out:
        up = subprocess.Popen([sys.executable, "-m", "scratchllm", "up", "--port", str(port), "--data-dir",
                               str(tmp_path / "data")], env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=2) as response:
                assert response.status == 200
                return up
        except OSError:
            assert time.monotonic() < deadline and up.poll() is None, "the service did not come up"
            time.sleep(0.5)


def wait_gone(pids: list[int], timeout_s: float = 20) -> bool:
    deadline = time.monotonic() + timeout_s
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not any(alive(p) for p in pids)


def worker_processes(up: subprocess.Popen) -> list[int]:
    deadline = time.monotonic() + 20
    while not (workers := children_of(up.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert workers, "no worker child process"
    return workers + [c for w in workers for c in children_of(w)]


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_up_serves_with_a_worker_and_ctrl_c_leaves_nothing_running(tmp_path):
    port = 18000 + os.getpid() % 1000
    up = start_up(tmp_path, port)
    try:
        assert (tmp_path / "data" / "scratchllm.db").is_file()
        assert status_of(f"http://127.0.0.1:{port}/v1/jobs") == 200  # its one local user needs no key
        deadline = time.monotonic() + 60
        while "Worker ready" not in (printed := (tmp_path / "up.out").read_text()):
            assert time.monotonic() < deadline, printed
            time.sleep(0.3)
        # a summary for the user; Celery's banner and the access log go to the log file
        assert f"ScratchLLM is running at http://localhost:{port}" in printed and f"{port}/docs" in printed
        assert str(tmp_path / "data") in printed and "not needed" in printed
        assert "celery@" not in printed and "GET /v1/jobs" not in printed and "superuser" not in printed.lower()
        logged = (tmp_path / "data" / "logs" / "scratchllm.log").read_text()
        assert "celery@" in logged and '"GET /v1/jobs HTTP/1.1" 200' in logged
        descendants = worker_processes(up)
        up.send_signal(signal.SIGINT)
        up.wait(timeout=60)
        assert wait_gone(descendants)
    finally:
        if up.poll() is None:
            up.kill()
        up.wait()


def test_the_worker_dies_with_a_killed_parent(tmp_path):
    up = start_up(tmp_path, 19000 + os.getpid() % 1000)
    descendants = worker_processes(up)
    up.kill()
    up.wait()
    assert wait_gone(descendants)


def test_up_keeps_keys_required_when_the_env_file_says_so(tmp_path):
    (tmp_path / ".env").write_text("SCRATCHLLM_API_KEYS_REQUIRED=true\n")
    port = 17000 + os.getpid() % 1000
    up = start_up(tmp_path, port)
    try:
        assert status_of(f"http://127.0.0.1:{port}/v1/jobs") == 401
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=60)


def test_the_api_serves_at_most_max_connections_at_once(tmp_path):
    import socket

    port = 16000 + os.getpid() % 1000
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCRATCHLLM_")}
    env.update(SCRATCHLLM_DATA_DIR=str(tmp_path / "data"), SCRATCHLLM_MAX_CONNECTIONS="2")
    api = subprocess.Popen([sys.executable, "-m", "scratchllm", "api", "--port", str(port), "--migrate"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    livez = f"http://127.0.0.1:{port}/livez"
    try:
        deadline = time.monotonic() + 60
        while status_of_or_none(livez) != 200:
            assert time.monotonic() < deadline and api.poll() is None, "the API did not come up"
            time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", port)):  # an idle connection holds its place
            time.sleep(0.3)
            assert status_of(livez) == 503
        time.sleep(0.3)
        assert status_of(livez) == 200
    finally:
        api.terminate()
        api.wait(timeout=30)


def status_of_or_none(url: str) -> int | None:
    try:
        return status_of(url)
    except OSError:
        return None
