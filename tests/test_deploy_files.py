"""The deployment files, checked without a Docker engine: Dockerfile, .dockerignore, docker-compose.yml.

docker-compose.yml is validated against the Compose specification's JSON schema (bundled with
check-jsonschema, so offline), then for what a schema cannot see: references between services and volumes,
the data volume api and worker share, the worker's GPU and its shutdown window, migrations before start.
The Dockerfile is parsed into stages and checked for its targets, user, stage references, torch pin and
build-context files; the project wheel it builds is built here from the same files. Every checker has
negative tests: a broken copy must be flagged.
"""

import copy
import json
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = REPO / "docker-compose.yml"

TARGETS = ("cpu", "cuda")  # `docker build --target ...`
DATA_DIR = "/data"  # SCRATCHLLM_DATA_DIR in the image and in compose
API_PORT = 8000
USER_NAME = "scratchllm"
SOFT_SHUTDOWN_DEFAULT_S = 60.0  # app.settings.Settings.worker_soft_shutdown_s
CPU_TORCH_INDEX = "download.pytorch.org/whl/cpu"


# ---------------------------------------------------------------------------------------------------------
# .dockerignore: the matching rules of Docker's patternmatcher (Go filepath.Match plus `**`, `!` exceptions,
# a pattern excludes a path when it matches the path or one of its parent directories, last match wins).


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        if negated:
            line = line[1:].strip()
        line = posixpath.normpath(line).lstrip("/")
        if line in ("", "."):
            continue
        rules.append((negated, re.compile(_pattern_regex(line))))
    return rules


def _pattern_regex(pattern: str) -> str:
    out, i = "", 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            if pattern[i + 1:i + 2] == "*":
                i += 1
                if pattern[i + 1:i + 2] == "/":
                    i += 1
                out += ".*" if i + 1 == len(pattern) else "(.*/)?"
            else:
                out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out += re.escape(ch)
            else:
                body = pattern[i + 1:end]
                out += "[" + ("^" + body[1:] if body.startswith("!") else body) + "]"
                i = end
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(ch)
        i += 1
    return out


def is_excluded(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = Path(path).as_posix().strip("/").split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for negated, regex in rules:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


# ---------------------------------------------------------------------------------------------------------
# Dockerfile: instructions (comments, line continuations, flags, exec form) grouped into stages.


@dataclass
class Instruction:
    cmd: str
    args: str
    flags: dict[str, str]
    line: int

    @property
    def exec_form(self) -> list[str] | None:
        if self.args.startswith("["):
            try:
                value = json.loads(self.args)
            except json.JSONDecodeError:
                return None
            return value if isinstance(value, list) else None
        return None


@dataclass
class Stage:
    index: int
    base: str
    name: str | None
    args: dict[str, str] = field(default_factory=dict)
    instructions: list[Instruction] = field(default_factory=list)


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    def chain(self, stage: Stage) -> list[Stage]:
        """The stage and the stages it is built FROM, the first one first."""
        out = [stage]
        while (parent := self.stage(out[-1].base)) is not None and parent.index < out[-1].index:
            out.append(parent)
        return out[::-1]

    def depends_on(self, stage: Stage) -> list[Stage]:
        """Every stage a build of `stage` runs (its chain and the stages it copies from), in file order."""
        seen: dict[int, Stage] = {}
        todo = [stage]
        while todo:
            for s in self.chain(todo.pop()):
                if s.index in seen:
                    continue
                seen[s.index] = s
                for ins in s.instructions:
                    source = self.copy_source(ins)
                    if source is not None:
                        todo.append(source)
        return [seen[i] for i in sorted(seen)]

    def copy_source(self, ins: Instruction) -> Stage | None:
        ref = ins.flags.get("from")
        if ins.cmd != "COPY" or ref is None:
            return None
        if ref.isdigit():
            return self.stages[int(ref)] if int(ref) < len(self.stages) else None
        return self.stage(ref)


FLAGGED = {"FROM", "COPY", "ADD", "RUN", "HEALTHCHECK"}


def parse_instructions(text: str) -> list[Instruction]:
    instructions, buffer, start = [], "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (buffer and not stripped):
            continue  # comments (also inside a continuation, which Docker drops) and blank continuation lines
        if not stripped:
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1].rstrip() + " "
            continue
        buffer += stripped
        instructions.append(_instruction(buffer, start))
        buffer = ""
    if buffer:
        instructions.append(_instruction(buffer, start))
    return instructions


def _instruction(text: str, line: int) -> Instruction:
    cmd, _, rest = text.strip().partition(" ")
    cmd, rest = cmd.upper(), rest.strip()
    flags = {}
    while cmd in FLAGGED and rest.startswith("--"):
        token, _, rest = rest.partition(" ")
        name, _, value = token[2:].partition("=")
        flags[name] = value
        rest = rest.strip()
    return Instruction(cmd, rest, flags, line)


def parse_dockerfile(text: str) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in parse_instructions(text):
        if ins.cmd == "FROM":
            words = ins.args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(len(stages), expand(words[0], global_args), name))
            continue
        if ins.cmd == "ARG":
            key, eq, value = ins.args.partition("=")
            scope = stages[-1].args if stages else global_args
            if eq:
                scope[key.strip()] = value.strip().strip('"')
            elif stages and key.strip() in global_args:
                scope[key.strip()] = global_args[key.strip()]
            if not stages:
                continue
        if not stages:
            raise ValueError(f"line {ins.line}: {ins.cmd} before the first FROM")
        stages[-1].instructions.append(ins)
    return Dockerfile(global_args, stages)


def expand(text: str, variables: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return variables.get(name, match.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def env_of(instructions: list[Instruction]) -> dict[str, str]:
    env = {}
    for ins in instructions:
        if ins.cmd != "ENV":
            continue
        words = shlex.split(ins.args)
        if words and "=" not in words[0]:  # legacy `ENV KEY value`
            env[words[0]] = " ".join(words[1:])
        else:
            env.update(word.split("=", 1) for word in words)
    return env


def last(instructions: list[Instruction], cmd: str) -> Instruction | None:
    return next((ins for ins in reversed(instructions) if ins.cmd == cmd), None)


def copied_context_paths(ins: Instruction) -> list[str]:
    words = ins.exec_form or shlex.split(ins.args)
    return words[:-1]


def is_project_install(command: str) -> bool:
    return bool(re.search(r"pip install\b[^;&|]*(\.whl|/wheels|\sscratchllm\b|\s\.(\s|$))", command))


def dockerfile_problems(dockerfile_text: str, dockerignore_text: str, repo: Path = REPO) -> list[str]:
    problems: list[str] = []
    try:
        df = parse_dockerfile(dockerfile_text)
    except ValueError as error:
        return [str(error)]
    rules = dockerignore_rules(dockerignore_text)
    pyproject = tomllib.loads((repo / "pyproject.toml").read_text())
    pin = re.search(r"torch==([\w.+]+)", (repo / "Makefile").read_text())
    make_pin = pin.group(1) if pin else None

    names = [s.name for s in df.stages if s.name]
    for name in {n for n in names if names.count(n) > 1}:
        problems.append(f"stage name {name!r} is used twice")
    for stage in df.stages:
        earlier = {s.name for s in df.stages[:stage.index]}
        if stage.base in names and stage.base not in earlier:
            problems.append(f"stage {stage.name or stage.index} is built FROM the later stage {stage.base!r}")
        elif stage.base not in earlier:
            image = stage.base.split("@")[0]
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            if "@" not in stage.base and tag in ("", "latest"):
                problems.append(f"base image {stage.base!r} is not pinned by a tag")
        for ins in stage.instructions:
            ref = ins.flags.get("from")
            if ins.cmd == "COPY" and ref is not None:
                source = df.copy_source(ins)
                if source is None or source.index >= stage.index:
                    problems.append(f"line {ins.line}: COPY --from={ref} names no earlier stage")
            elif ins.cmd in ("COPY", "ADD"):
                problems += _context_problems(ins, rules, repo)

    for target in TARGETS:
        stage = df.stage(target)
        if stage is None:
            problems.append(f"no stage named {target!r}: `docker build --target {target}` fails")
            continue
        problems += [f"target {target}: {p}" for p in _target_problems(df, stage, make_pin)]

    problems += _wheel_stage_problems(df, pyproject)
    return problems


def _context_problems(ins: Instruction, rules, repo: Path) -> list[str]:
    problems = []
    for source in copied_context_paths(ins):
        rel = posixpath.normpath(source).lstrip("/")
        if rel.startswith(".."):
            problems.append(f"line {ins.line}: {ins.cmd} {source} points outside the build context")
            continue
        matches = sorted(repo.glob(rel)) if any(c in rel for c in "*?[") else [repo / rel]
        if not matches or not all(m.exists() for m in matches):
            problems.append(f"line {ins.line}: {ins.cmd} {source}: it does not exist in the repository")
            continue
        for match in matches:
            path = match.relative_to(repo).as_posix()
            if is_excluded(path, rules):
                problems.append(f"line {ins.line}: {ins.cmd} {source}: {path} is excluded by .dockerignore")
            elif match.is_dir():
                files = [f.relative_to(repo).as_posix() for f in match.rglob("*") if f.is_file()]
                dropped = [f for f in files if f.endswith(".py") and is_excluded(f, rules)]
                if dropped:
                    problems.append(f"line {ins.line}: {ins.cmd} {source}: .dockerignore excludes {dropped[:3]}")
    return problems


def _target_problems(df: Dockerfile, stage: Stage, make_pin: str | None) -> list[str]:
    problems = []
    instructions = [ins for s in df.chain(stage) for ins in s.instructions]
    user = last(instructions, "USER")
    if user is None or user.args.split(":")[0] in ("root", "0"):
        problems.append("runs as root: it needs a USER that is not root")
    entrypoint = last(instructions, "ENTRYPOINT")
    if entrypoint is None or entrypoint.exec_form != ["scratchllm"]:
        problems.append('ENTRYPOINT must be ["scratchllm"]')
    healthcheck = last(instructions, "HEALTHCHECK")
    if healthcheck is None or healthcheck.args.upper() == "NONE":
        problems.append("no HEALTHCHECK")
    elif not re.search(rf":{API_PORT}/(livez|health)\b", healthcheck.args):
        problems.append(f"the HEALTHCHECK does not ask /livez or /health on port {API_PORT}")
    exposed = {w.split("/")[0] for ins in instructions if ins.cmd == "EXPOSE" for w in ins.args.split()}
    if str(API_PORT) not in exposed:
        problems.append(f"does not EXPOSE {API_PORT}")
    env = env_of(instructions)
    for key in ("PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"):
        if not env.get(key):
            problems.append(f"ENV {key} is not set")
    if env.get("SCRATCHLLM_DATA_DIR") != DATA_DIR:
        problems.append(f"ENV SCRATCHLLM_DATA_DIR is not {DATA_DIR}")
    runs = [ins.args for ins in instructions if ins.cmd == "RUN"]
    owner = user.args.split(":")[0] if user else ""
    if not any(re.search(rf"chown\s+(-\S+\s+)*{re.escape(owner)}\S*\s+{DATA_DIR}\b", r) for r in runs):
        problems.append(f"{DATA_DIR} is not chowned to the USER {owner!r}")

    installs = []  # (stage, position of the project install in its chain)
    for s in df.depends_on(stage):
        chain = [ins for c in df.chain(s) for ins in c.instructions]
        installs += [(s, chain, i) for i, ins in enumerate(chain)
                     if ins.cmd == "RUN" and is_project_install(ins.args) and ins in s.instructions]
    if not installs:
        problems.append("installs no project (pip install of the wheel)")
    for s, chain, position in installs:
        args = {k: v for c in df.chain(s) for k, v in c.args.items()}
        torch_runs = [expand(ins.args, args) for ins in chain[:position] if ins.cmd == "RUN"
                      and "pip install" in ins.args and re.search(r"torch==", ins.args)]
        if not torch_runs:
            problems.append(f"stage {s.name}: no pinned torch (torch==...) is installed before the project")
            continue
        pins = re.findall(r"torch==([\w.+]+)", torch_runs[-1])
        if make_pin and pins != [make_pin]:
            problems.append(f"stage {s.name}: torch pin {pins} differs from the Makefile's torch=={make_pin}")
        cpu_build = CPU_TORCH_INDEX in torch_runs[-1]
        if cpu_build != (stage.name == "cpu"):
            problems.append(f"stage {s.name}: the {'CPU' if cpu_build else 'CUDA'} build of torch "
                            f"(cpu index {'used' if cpu_build else 'not used'})")
    return problems


def wheel_stage(df: Dockerfile) -> Stage | None:
    return next((s for s in df.stages if any(i.cmd == "RUN" and "pip wheel" in i.args
                                             for i in s.instructions)), None)


def _wheel_stage_problems(df: Dockerfile, pyproject: dict) -> list[str]:
    stage = wheel_stage(df)
    if stage is None:
        return ["no stage builds the project wheel (pip wheel)"]
    copied = {posixpath.normpath(p).lstrip("/") for s in df.chain(stage) for ins in s.instructions
              if ins.cmd == "COPY" and "from" not in ins.flags for p in copied_context_paths(ins)}
    needed = {"pyproject.toml", pyproject["project"]["readme"]} | set(top_level_packages(pyproject))
    return [f"stage {stage.name}: {path} is not copied in, the wheel build needs it"
            for path in sorted(needed - copied)]


def top_level_packages(pyproject: dict) -> list[str]:
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted({pattern.rstrip("*").split(".")[0] for pattern in include})


# ---------------------------------------------------------------------------------------------------------
# docker-compose.yml


def interpolate_defaults(value) -> str:
    """`${VAR:-default}` and `${VAR-default}` as their default, `${VAR}` as empty: the value when unset."""
    text = str(value)
    text = re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", text)
    return text.replace("$$", "$")


def duration_s(value) -> float:
    if isinstance(value, int | float):
        return float(value)
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    text = interpolate_defaults(value).strip()
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {value!r}")
    return sum(float(n) * units[u] for n, u in parts)


def environment(service: dict) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def depends_on(service: dict) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def mounts(service: dict) -> list[tuple[str, str, str]]:
    """(type, source, target) of each volume entry."""
    out = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            out.append((volume.get("type", "volume"), volume.get("source", ""), volume["target"]))
            continue
        parts = str(volume).split(":")
        if len(parts) == 1:
            out.append(("volume", "", parts[0]))
            continue
        source, target = parts[0], parts[1]
        kind = "bind" if source.startswith(("/", ".", "~", "$")) else "volume"
        out.append((kind, source, target))
    return out


def healthcheck_test(service: dict) -> str | None:
    check = service.get("healthcheck")
    if not check or check.get("disable") or not check.get("test"):
        return None
    test = check["test"]
    if isinstance(test, list):
        if test[0] == "NONE":
            return None
        test = " ".join(test[1:])
    return test


def command_words(service: dict) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(w) for w in command]


def container_ports(service: dict) -> set[int]:
    ports = set()
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            ports.add(int(port["target"]))
        else:
            ports.add(int(interpolate_defaults(port).split("/")[0].rsplit(":", 1)[-1]))
    return ports


def compose_problems(compose: dict, dockerfile_stages: set[str] | None = None) -> list[str]:
    problems: list[str] = []
    if "version" in compose:
        problems.append("the top-level `version` key is obsolete in the Compose specification")
    services: dict[str, dict] = compose.get("services") or {}
    declared_volumes = set((compose.get("volumes") or {}).keys())

    for required in ("postgres", "redis", "migrate", "api", "worker"):
        if required not in services:
            problems.append(f"no service {required!r}")
    for name, service in services.items():
        for dep, condition in depends_on(service).items():
            if dep not in services:
                problems.append(f"{name} depends on the undefined service {dep!r}")
            elif dep == name:
                problems.append(f"{name} depends on itself")
            elif condition == "service_healthy" and healthcheck_test(services[dep]) is None:
                problems.append(f"{name} waits for {dep} to be healthy but {dep} has no healthcheck")
            if condition not in ("service_started", "service_healthy", "service_completed_successfully"):
                problems.append(f"{name}: unknown depends_on condition {condition!r}")
        for kind, source, _ in mounts(service):
            if kind == "volume" and source and source not in declared_volumes:
                problems.append(f"{name} mounts the volume {source!r}, which is not declared under volumes:")
        if "build" in service and dockerfile_stages is not None:
            target = (service["build"] or {}).get("target") if isinstance(service["build"], dict) else None
            if target is not None and target not in dockerfile_stages:
                problems.append(f"{name} builds the target {target!r}, which the Dockerfile lacks")
        restart = str(service.get("restart", "always"))
        if name != "migrate" and not re.fullmatch(r"always|unless-stopped|on-failure(:\d+)?", restart):
            problems.append(f"{name} is long-running but restart is {service['restart']!r}")
    problems += _cycles(services)
    if any(name not in services for name in ("postgres", "redis", "migrate", "api", "worker")):
        return problems

    redis, migrate = services["redis"], services["migrate"]
    api, worker = services["api"], services["worker"]
    for name in ("postgres", "redis", "api", "worker"):
        if "restart" not in services[name]:
            problems.append(f"{name} has no restart policy")
    for name, needle in (("postgres", "pg_isready"), ("redis", "ping"), ("api", None)):
        test = healthcheck_test(services[name])
        if test is None:
            problems.append(f"{name} has no healthcheck")
        elif needle and needle not in test:
            problems.append(f"{name}'s healthcheck does not run {needle}")
    api_test = healthcheck_test(api)
    if api_test is not None and not re.search(rf":{API_PORT}/(livez|health)\b", api_test):
        problems.append(f"api's healthcheck does not ask /livez or /health on port {API_PORT}")

    redis_command = " ".join(command_words(redis))
    if not re.search(r"--appendonly\s+yes", redis_command):
        problems.append("redis runs without --appendonly yes: queued jobs would not survive a restart")
    if not any(target == "/data" for kind, source, target in mounts(redis) if kind == "volume" and source):
        problems.append("redis keeps its append-only file in no named volume (/data)")

    if command_words(migrate)[:2] != ["db", "upgrade"]:
        problems.append("migrate does not run `db upgrade`")
    if migrate.get("restart", "no") != "no":
        problems.append(f"migrate is one-shot: restart must be \"no\", not {migrate.get('restart')!r}")
    if depends_on(migrate).get("postgres") != "service_healthy":
        problems.append("migrate does not wait for postgres to be healthy")

    for name, service in (("api", api), ("worker", worker)):
        deps = depends_on(service)
        if deps.get("migrate") != "service_completed_successfully":
            problems.append(f"{name} does not wait for migrate to complete successfully")
        if deps.get("redis") not in ("service_healthy", None) or (name == "api" and "redis" not in deps):
            problems.append(f"{name} does not wait for redis to be healthy")
    if command_words(api)[:1] != ["api"] or "--port" not in command_words(api):
        problems.append("api does not run `api --port ...`")
    elif command_words(api)[command_words(api).index("--port") + 1] != str(API_PORT):
        problems.append(f"api does not listen on {API_PORT}")
    if API_PORT not in container_ports(api):
        problems.append(f"api does not publish its port {API_PORT}")
    if command_words(worker)[:1] != ["worker"]:
        problems.append("worker does not run `worker`")

    problems += _shared_settings_problems(services)
    problems += _data_volume_problems(api, worker, declared_volumes)
    problems += _worker_problems(worker)
    return problems


def _shared_settings_problems(services: dict[str, dict]) -> list[str]:
    problems = []
    envs = {name: environment(services[name]) for name in ("migrate", "api", "worker")}
    for key in ("SCRATCHLLM_DATABASE_URL", "SCRATCHLLM_BROKER_URL", "SCRATCHLLM_DATA_DIR"):
        values = {name: env.get(key) for name, env in envs.items()}
        if None in values.values() or len(set(values.values())) != 1:
            problems.append(f"{key} is not the same in migrate, api and worker: {values}")
    for key, service, schemes in (("SCRATCHLLM_DATABASE_URL", "postgres", ("postgresql",)),
                                  ("SCRATCHLLM_BROKER_URL", "redis", ("redis",))):
        url = envs["api"].get(key)
        if url is None:
            continue
        parts = urlsplit(interpolate_defaults(url))
        if parts.hostname != service or not parts.scheme.startswith(schemes):
            problems.append(f"{key} ({url}) does not point at the {service} service")
    return problems


def _data_volume_problems(api: dict, worker: dict, declared: set[str]) -> list[str]:
    problems = []
    data_mounts = {}
    for name, service in (("api", api), ("worker", worker)):
        data_dir = environment(service).get("SCRATCHLLM_DATA_DIR")
        found = [(source, target) for kind, source, target in mounts(service)
                 if kind == "volume" and source and target == data_dir]
        if not found:
            problems.append(f"{name} mounts no named volume at its SCRATCHLLM_DATA_DIR ({data_dir})")
        else:
            data_mounts[name] = found[0]
    if len(data_mounts) == 2 and data_mounts["api"] != data_mounts["worker"]:
        problems.append(f"api and worker do not mount the same data volume at the same path: {data_mounts}")
    if any(target != DATA_DIR for _, target in data_mounts.values()):
        problems.append(f"the data volume is not at {DATA_DIR}, the image's data dir")
    return problems


def _worker_problems(worker: dict) -> list[str]:
    problems = []
    build = worker.get("build")
    if not isinstance(build, dict) or build.get("target") != "cuda":
        problems.append("worker is not built from the cuda target")
    devices = (((worker.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices")
    gpus = [d for d in devices or [] if "gpu" in (d.get("capabilities") or []) and d.get("driver") == "nvidia"
            and (d.get("count") is not None or d.get("device_ids"))]
    if not gpus:
        problems.append("worker reserves no GPU (deploy.resources.reservations.devices, driver nvidia)")
    soft = environment(worker).get("SCRATCHLLM_WORKER_SOFT_SHUTDOWN_S")
    soft_s = float(interpolate_defaults(soft)) if soft is not None else SOFT_SHUTDOWN_DEFAULT_S
    try:
        grace_s = duration_s(worker.get("stop_grace_period", "10s"))
    except ValueError as error:
        problems.append(f"worker stop_grace_period: {error}")
    else:
        if grace_s <= soft_s:
            problems.append(f"worker stop_grace_period ({grace_s:g} s) is not longer than its soft shutdown "
                            f"({soft_s:g} s): Docker would kill the job before it is re-queued")
    if worker.get("stop_signal", "SIGTERM") != "SIGTERM":
        problems.append(f"worker stop_signal is {worker['stop_signal']}, the soft shutdown answers SIGTERM")
    return problems


def _cycles(services: dict[str, dict]) -> list[str]:
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> list[str]:
        if state.get(name) == 1:
            return [f"depends_on cycle: {' -> '.join(path + [name])}"]
        if state.get(name) == 2 or name not in services:
            return []
        state[name] = 1
        found = [p for dep in depends_on(services[name]) for p in visit(dep, path + [name])]
        state[name] = 2
        return found

    return [p for name in services for p in visit(name, [])]


def check_compose_file(path: Path) -> list[str]:
    compose = yaml.safe_load(path.read_text())
    stages = {s.name for s in parse_dockerfile(DOCKERFILE.read_text()).stages if s.name}
    return compose_problems(compose, stages)


def schema_check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(path)], capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------------------------------------
# The files as they are


def test_compose_file_matches_the_compose_specification():
    result = schema_check(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_is_consistent():
    assert check_compose_file(COMPOSE) == []


def test_compose_services_share_settings_through_an_x_anchor():
    text = COMPOSE.read_text()
    anchors = re.findall(r"^(x-[\w-]+):\s*&([\w-]+)", text, re.M)
    assert anchors, "no x- extension field with a YAML anchor"
    for _, anchor in anchors:
        assert f"*{anchor}" in text


def test_dockerfile_is_consistent():
    assert dockerfile_problems(DOCKERFILE.read_text(), DOCKERIGNORE.read_text()) == []


def test_dockerignore_keeps_the_build_inputs_and_drops_the_rest():
    rules = dockerignore_rules(DOCKERIGNORE.read_text())
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    for path in ["pyproject.toml", "README.md", *(f"{p}/__init__.py" for p in top_level_packages(pyproject))]:
        assert not is_excluded(path, rules), path
    for path in [".git/HEAD", ".venv/bin/python", "runs/demo/tokens.bin", "data/corpus.txt",
                 "model/__pycache__/gpt.cpython-311.pyc", ".pytest_cache/v/x", ".ruff_cache/x",
                 "scratchllm.egg-info/PKG-INFO", ".env", "build/lib/model/gpt.py"]:
        assert is_excluded(path, rules), path


def test_the_image_wheel_holds_every_package_file_and_the_console_script(tmp_path):
    """Builds the wheel from exactly the files the Dockerfile's wheel stage copies, as `docker build` would."""
    pytest.importorskip("setuptools.command.bdist_wheel", reason="building the wheel offline needs setuptools>=70.1")
    df = parse_dockerfile(DOCKERFILE.read_text())
    rules = dockerignore_rules(DOCKERIGNORE.read_text())
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    stage = wheel_stage(df)
    assert stage is not None
    context = tmp_path / "src"
    context.mkdir()
    workdir = "/"
    for s in df.chain(stage):
        for ins in s.instructions:
            if ins.cmd == "WORKDIR":
                workdir = posixpath.join(workdir, ins.args)
            if ins.cmd != "COPY" or "from" in ins.flags:
                continue
            words = ins.exec_form or shlex.split(ins.args)
            sources, dest = words[:-1], posixpath.relpath(posixpath.join(workdir, words[-1]), workdir)
            assert not dest.startswith(".."), f"line {ins.line}: copies outside the WORKDIR {workdir}"
            dest += "/" if words[-1].endswith("/") else ""
            for source in sources:
                src = REPO / source
                into = context / dest
                if src.is_dir():
                    for f in src.rglob("*"):
                        rel = f.relative_to(REPO).as_posix()
                        if f.is_file() and not is_excluded(rel, rules):
                            target = into / f.relative_to(src)
                            target.parent.mkdir(parents=True, exist_ok=True)
                            shutil.copy2(f, target)
                else:
                    target = into / src.name if dest.endswith("/") or len(sources) > 1 else into
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, target)
    out = tmp_path / "wheels"
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                             "--no-index", "--disable-pip-version-check", "-q", "--wheel-dir", str(out),
                             str(context)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = out.glob("scratchllm-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    missing = []
    for package in top_level_packages(pyproject):
        for f in sorted((REPO / package).rglob("*")):
            rel = f.relative_to(REPO).as_posix()
            if f.is_file() and not is_excluded(rel, rules) and rel not in names:
                missing.append(rel)
    assert missing == [], "files of the packages the image would lack (package-data or __init__.py missing?)"
    entrypoint = last([i for s in df.chain(df.stage("cuda")) for i in s.instructions], "ENTRYPOINT")
    for script, target in pyproject["project"]["scripts"].items():
        assert re.search(rf"^{re.escape(script)} = {re.escape(target)}$", entry_points, re.M)
    assert entrypoint.exec_form[0] in pyproject["project"]["scripts"]


# ---------------------------------------------------------------------------------------------------------
# The checkers themselves: each must flag a broken copy.


def test_dockerfile_parser_joins_continuations_skips_comments_and_reads_flags():
    df = parse_dockerfile(
        "# syntax=docker/dockerfile:1\nARG V=1.2\nFROM python:3.11-slim AS base\n"
        "RUN echo a \\\n    # a comment inside the continuation\n    && echo b\n"
        "COPY --from=base --chown=u:g /a /b\nFROM base AS final\nARG V\n"
        'HEALTHCHECK --interval=5s \\\n  CMD ["python", "-c", "pass"]\nUSER app\n'
    )
    base, final = df.stages
    assert (base.name, base.base, final.base) == ("base", "python:3.11-slim", "base")
    run, copy_ = base.instructions
    assert run.args == "echo a && echo b" and run.line == 4
    assert copy_.flags == {"from": "base", "chown": "u:g"} and copy_.args == "/a /b"
    assert final.args == {"V": "1.2"}
    healthcheck = final.instructions[1]
    assert healthcheck.flags == {"interval": "5s"} and healthcheck.args.startswith("CMD [")
    assert [s.name for s in df.chain(final)] == ["base", "final"]


@pytest.mark.parametrize(("path", "patterns", "excluded"), [
    ("a/b/c.pyc", "**/*.pyc", True),
    ("c.pyc", "**/*.pyc", True),
    (".venv/lib/x.py", ".venv", True),
    ("model/venv/x", "venv", False),
    ("model/x.py", "*\n!model", False),
    ("model/__pycache__/x", "*\n!model\n**/__pycache__", True),
    ("docs/a.md", "/docs/", True),
    ("x.pyo", "*.py[cod]", True),
])
def test_dockerignore_matcher_follows_docker(path, patterns, excluded):
    assert is_excluded(path, dockerignore_rules(patterns)) is excluded


def _set(path: str, value) -> Callable[[dict], None]:
    def mutate(compose: dict) -> None:
        *parents, key = path.split(".")
        node = compose
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = value

    return mutate


def _delete(path: str) -> Callable[[dict], None]:
    def mutate(compose: dict) -> None:
        *parents, key = path.split(".")
        node = compose
        for parent in parents:
            node = node[parent]
        del node[key]

    return mutate


def _both(*mutations: Callable[[dict], None]) -> Callable[[dict], None]:
    def mutate(compose: dict) -> None:
        for m in mutations:
            m(compose)

    return mutate


COMPOSE_BREAKAGES = [
    ("undefined-dependency", _set("services.api.depends_on.queue", {"condition": "service_started"}),
     "undefined service 'queue'"),
    ("undeclared-volume", _delete("volumes.scratchllm-data"), "not declared"),
    ("worker-data-elsewhere", _set("services.worker.volumes", ["scratchllm-data:/srv/data"]), "no named volume"),
    ("worker-data-dir-env", _set("services.worker.environment.SCRATCHLLM_DATA_DIR", "/srv"),
     "SCRATCHLLM_DATA_DIR is not the same"),
    ("api-other-volume", _both(_set("services.api.volumes", ["other:/data"]), _set("volumes.other", None)),
     "same data volume"),
    ("worker-data-bind-mount", _set("services.worker.volumes", ["./data:/data"]), "worker mounts no named"),
    ("no-gpu", _delete("services.worker.deploy"), "reserves no GPU"),
    ("gpu-without-capability", _set("services.worker.deploy.resources.reservations.devices",
                                    [{"driver": "nvidia", "count": 1, "capabilities": ["compute"]}]),
     "reserves no GPU"),
    ("grace-shorter", _set("services.worker.stop_grace_period", "30s"), "not longer than its soft shutdown"),
    ("grace-equal", _set("services.worker.stop_grace_period", "1m"), "not longer than its soft shutdown"),
    ("grace-default", _delete("services.worker.stop_grace_period"), "not longer than its soft shutdown"),
    ("soft-shutdown-raised", _set("services.worker.environment.SCRATCHLLM_WORKER_SOFT_SHUTDOWN_S", "${X:-120}"),
     "not longer than its soft shutdown"),
    ("stop-signal", _set("services.worker.stop_signal", "SIGKILL"), "stop_signal"),
    ("worker-cpu-target", _set("services.worker.build.target", "cpu"), "cuda target"),
    ("unknown-target", _set("services.api.build.target", "gpu"), "Dockerfile lacks"),
    ("migrate-command", _set("services.migrate.command", ["db", "current"]), "db upgrade"),
    ("migrate-restart-unquoted-no", _set("services.migrate.restart", False), "one-shot"),
    ("migrate-without-postgres", _delete("services.migrate.depends_on"), "wait for postgres"),
    ("postgres-healthcheck", _delete("services.postgres.healthcheck"), "postgres has no healthcheck"),
    ("redis-healthcheck-disabled", _set("services.redis.healthcheck", {"disable": True}),
     "redis has no healthcheck"),
    ("api-healthcheck", _delete("services.api.healthcheck"), "api has no healthcheck"),
    ("api-healthcheck-path", _set("services.api.healthcheck.test", ["CMD", "true"]), "/livez or /health"),
    ("api-before-migrate", _set("services.api.depends_on.migrate.condition", "service_started"),
     "api does not wait for migrate"),
    ("worker-before-migrate", _delete("services.worker.depends_on.migrate"), "worker does not wait for migrate"),
    ("healthy-without-healthcheck", _set("services.api.depends_on.worker", {"condition": "service_healthy"}),
     "worker has no healthcheck"),
    ("cycle", _set("services.migrate.depends_on.api", {"condition": "service_started"}), "cycle"),
    ("redis-no-aof", _set("services.redis.command", ["redis-server"]), "appendonly"),
    ("database-host", _set("services.api.environment.SCRATCHLLM_DATABASE_URL",
                           "postgresql+psycopg://u:p@db:5432/x"), "SCRATCHLLM_DATABASE_URL"),
    ("api-port", _set("services.api.ports", ["8080:8080"]), "publish its port"),
    ("api-restart", _set("services.api.restart", "no"), "long-running"),
    ("version-key", _set("version", "3.8"), "version"),
    ("no-worker", _delete("services.worker"), "no service 'worker'"),
]


@pytest.mark.parametrize(("mutate", "expected"), [pytest.param(m, e, id=i) for i, m, e in COMPOSE_BREAKAGES])
def test_compose_checker_flags_a_broken_file(tmp_path, mutate, expected):
    compose = copy.deepcopy(yaml.safe_load(COMPOSE.read_text()))
    mutate(compose)
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(compose, sort_keys=False))
    problems = check_compose_file(broken)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(("old", "new"), [
    pytest.param("    shm_size: 2gb\n", "    shm_size: [2gb]\n", id="wrong-type"),
    pytest.param("      - driver: nvidia\n", "      - drivers: nvidia\n", id="unknown-device-key"),
    pytest.param("    stop_grace_period: 90s\n", "    stop_grace_period: 90s\n    stop_grace: 90s\n",
                 id="unknown-service-key"),
    pytest.param("\nservices:\n", "\nservices:\n  bad name!: {image: redis:7}\n", id="bad-service-name"),
])
def test_compose_schema_check_flags_a_broken_file(tmp_path, old, new):
    text = COMPOSE.read_text()
    assert old in text
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace(old, new, 1))
    assert schema_check(broken).returncode != 0


def _replace(old: str, new: str, count: int = 1) -> Callable[[str], str]:
    def mutate(text: str) -> str:
        assert old in text, old
        return text.replace(old, new, count)

    return mutate


def _regex(pattern: str, new: str) -> Callable[[str], str]:
    def mutate(text: str) -> str:
        changed, n = re.subn(pattern, new, text, count=1, flags=re.S | re.M)
        assert n == 1, pattern
        return changed

    return mutate


DOCKERFILE_BREAKAGES = [
    ("no-cuda-stage", _replace("AS cuda", "AS gpu"), "no stage named 'cuda'"),
    ("no-cpu-stage", _replace("AS cpu", "AS small"), "no stage named 'cpu'"),
    ("root-user", _replace("USER scratchllm", "USER root"), "runs as root"),
    ("uid-0", _replace("USER scratchllm", "USER 0:0"), "runs as root"),
    ("no-user", _replace("USER scratchllm\n", ""), "runs as root"),
    ("root-in-one-target", _replace("FROM runtime AS cuda\n", "FROM runtime AS cuda\nUSER root\n"),
     "target cuda: runs as root"),
    ("copy-from-unknown", _replace("COPY --from=venv-cuda", "COPY --from=venv-gpu"), "names no earlier stage"),
    ("copy-from-later", _replace("COPY --from=wheel", "COPY --from=cpu"), "names no earlier stage"),
    ("from-later-stage", _replace("FROM venv AS venv-cpu", "FROM runtime AS venv-cpu"), "later stage"),
    ("unpinned-base", _replace("python:3.11-slim-bookworm", "python"), "not pinned"),
    ("latest-base", _replace("python:3.11-slim-bookworm", "python:latest"), "not pinned"),
    ("torch-unpinned", _replace('"torch==${TORCH_VERSION}"', "torch"), "no pinned torch"),
    ("torch-after-project", _regex(r"^(RUN pip install --index-url \"\$\{TORCH_CUDA_INDEX_URL\}\".*?\n)"
                                   r"(COPY --from=wheel /wheels /wheels\nRUN pip install /wheels/\*\.whl.*?\n)",
                                   r"\2\1"), "stage venv-cuda: no pinned torch"),
    ("torch-pin-differs", _replace("ARG TORCH_VERSION=2.13.0", "ARG TORCH_VERSION=2.12.0"), "Makefile"),
    ("cpu-target-gets-cuda-torch", _replace("COPY --from=venv-cpu", "COPY --from=venv-cuda"), "CUDA build"),
    ("cuda-target-gets-cpu-torch", _replace("COPY --from=venv-cuda", "COPY --from=venv-cpu"), "CPU build"),
    ("no-project-install", _replace("RUN pip install /wheels/*.whl", "RUN ls /wheels/", 2), "installs no project"),
    ("entrypoint", _replace('ENTRYPOINT ["scratchllm"]', 'ENTRYPOINT ["python", "-m", "app.cli"]'),
     "ENTRYPOINT"),
    ("shell-entrypoint", _replace('ENTRYPOINT ["scratchllm"]', "ENTRYPOINT scratchllm"), "ENTRYPOINT"),
    ("no-healthcheck", _regex(r"^HEALTHCHECK .*?\n(?=ENTRYPOINT)", ""), "no HEALTHCHECK"),
    ("healthcheck-none", _replace("FROM runtime AS cpu\n", "FROM runtime AS cpu\nHEALTHCHECK NONE\n"),
     "target cpu: no HEALTHCHECK"),
    ("healthcheck-path", _replace("8000/livez", "8000/metrics"), "/livez or /health"),
    ("no-expose", _replace("EXPOSE 8000\n", ""), "EXPOSE"),
    ("no-unbuffered", _replace("    PYTHONUNBUFFERED=1 \\\n", ""), "PYTHONUNBUFFERED"),
    ("data-dir-not-owned", _replace("chown scratchllm:scratchllm /data", "chown root /data"), "not chowned"),
    ("data-dir-env", _replace("SCRATCHLLM_DATA_DIR=/data", "SCRATCHLLM_DATA_DIR=/srv"), "SCRATCHLLM_DATA_DIR"),
    ("copy-missing-file", _replace("COPY migrations ./migrations", "COPY alembic ./alembic"),
     "does not exist"),
    ("package-not-copied", _replace("COPY worker ./worker\n", ""), "worker is not copied in"),
    ("readme-not-copied", _replace("COPY pyproject.toml README.md ./", "COPY pyproject.toml ./"),
     "README.md is not copied in"),
    ("copy-outside-context", _replace("COPY app ./app", "COPY ../app ./app"), "outside the build context"),
    ("no-wheel-stage", _replace("python -m pip wheel", "python -m pip download"), "no stage builds"),
    ("before-from", _replace("ARG TORCH_VERSION=2.13.0\n", "ARG TORCH_VERSION=2.13.0\nENV A=1\n"),
     "before the first FROM"),
]


@pytest.mark.parametrize(("mutate", "expected"), [pytest.param(m, e, id=i) for i, m, e in DOCKERFILE_BREAKAGES])
def test_dockerfile_checker_flags_a_broken_file(mutate, expected):
    problems = dockerfile_problems(mutate(DOCKERFILE.read_text()), DOCKERIGNORE.read_text())
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("pattern", ["app", "**/*.py", "*\n!model\n!pyproject.toml\n!README.md", "README*"])
def test_dockerfile_checker_flags_a_dockerignore_that_drops_build_inputs(pattern):
    ignore = DOCKERIGNORE.read_text() + "\n" + pattern + "\n"
    problems = dockerfile_problems(DOCKERFILE.read_text(), ignore)
    assert any("excluded by .dockerignore" in p or ".dockerignore excludes" in p for p in problems), problems
