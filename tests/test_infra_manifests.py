"""infra/ manifests and containers, checked without Kubernetes, a cloud or docker: every KubeRay manifest
and cluster-launcher YAML against its schema (a misspelt field fails), the RayJobs' entrypoints through
the stages' own config loaders, and the Dockerfiles' properties (CUDA stack, launcher compatibility)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # infra/ is tooling, not part of the installed package
    sys.path.insert(0, str(REPO))

from infra import manifest_check  # noqa: E402

K8S = REPO / "infra/k8s"
LAUNCHER = REPO / "infra/cluster-launcher/aws-gpu.yaml"
# torch 2.14.1's Linux wheel on the registry requires cuda-toolkit==13.0.3 (and nvidia-*-cu13): a CUDA 13.0
# build. Re-check with: pip install --dry-run --no-deps --ignore-installed --report r.json torch==2.14.1
TORCH_VERSION, TORCH_WHEEL_CUDA = "2.14.1", "13.0"


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _walk(node, key):
    """Every value stored under `key` anywhere in a parsed YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)


def _env_entries(doc):
    for env in _walk(doc, "env"):
        yield from env if isinstance(env, list) else []


def _groups(cluster_spec):
    return {g["groupName"]: g for g in cluster_spec.get("workerGroupSpecs", [])}


def _limits(group) -> dict:
    return group["template"]["spec"]["containers"][0]["resources"]["limits"]


# --------------------------------------------------------------------------------------------------
# Schemas


def test_every_manifest_matches_its_schema():
    paths = manifest_check.default_paths()
    assert {p.name for p in paths} == {"raycluster.yaml", "rayjob-tokenize.yaml", "rayjob-pretrain.yaml",
                                      "rayjob-eval.yaml", "aws-gpu.yaml"}
    assert manifest_check.check_files(paths) == []


def _misspell(doc, path: list, new_key: str):
    node = doc
    for k in path[:-1]:
        node = node[k]
    node[new_key] = node.pop(path[-1])
    return doc


HEAD_CONTAINER = ["spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containers", 0]


@pytest.mark.parametrize("name, path, typo, where", [
    ("rayjob-pretrain.yaml", ["spec", "entrypoint"], "entrypiont", "spec"),
    ("rayjob-tokenize.yaml", ["spec", "rayClusterSpec", "authOptions", "mode"], "mdoe", "spec/rayClusterSpec/authOptions"),
    ("rayjob-eval.yaml", HEAD_CONTAINER + ["resources"], "resource",
     "spec/rayClusterSpec/headGroupSpec/template/spec/containers/0"),
    ("raycluster.yaml", ["spec", "workerGroupSpecs", 1, "maxReplicas"], "maxReplica", "spec/workerGroupSpecs/1"),
    ("aws-gpu.yaml", ["docker", "image"], "imgae", "docker"),
    ("aws-gpu.yaml", ["head_node_type"], "head_node_typ", "(top level)"),
])
def test_a_misspelt_field_fails_the_check(tmp_path, name, path, typo, where):
    src = LAUNCHER if name == "aws-gpu.yaml" else K8S / name
    doc = _misspell(_load(src), path, typo)
    errors = manifest_check.manifest_errors(doc)
    assert any(e.startswith(where + ":") and repr(typo) in e for e in errors), errors
    if typo not in ("entrypiont", "imgae"):  # the CLI once per kind of file is enough
        return
    bad = tmp_path / name
    bad.write_text(yaml.safe_dump(doc))
    r = subprocess.run([sys.executable, "-m", "infra.manifest_check", str(bad)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and f"{bad}: {where}:" in r.stderr and typo in r.stderr, r.stdout + r.stderr


def test_a_wrong_type_or_enum_fails_the_check():
    job = _load(K8S / "rayjob-pretrain.yaml")
    job["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "tokens"
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "8"
    errors = manifest_check.manifest_errors(job)
    assert any(e.startswith("spec/rayClusterSpec/authOptions/mode:") and "'tokens'" in e for e in errors), errors
    assert any(e.startswith("spec/rayClusterSpec/workerGroupSpecs/0/replicas:") for e in errors), errors


# --------------------------------------------------------------------------------------------------
# What the manifests say


def test_token_auth_through_authOptions_and_no_inline_secrets():
    for path in sorted(K8S.glob("*.yaml")):
        doc = _load(path)
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        assert spec["authOptions"] == {"mode": "token", "secretName": "mimflow-ray-token"}, path.name
        for e in _env_entries(doc):
            if re.search(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL", e["name"], re.I):
                assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), f"{path.name}: {e['name']}"
        # the operator sets RAY_AUTH_* in Ray containers from authOptions; only the submitter sets its own
        ray_containers = [c for c in _walk(spec, "containers") for c in c]
        assert all(not any(e["name"].startswith("RAY_AUTH") for e in c.get("env", [])) for c in ray_containers)
        # object-storage credentials: the standard AWS variables, each from the storage Secret
        for c in ray_containers:
            refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c.get("env", []) if "valueFrom" in e}
            for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
                assert refs[var] == {"name": "mimflow-storage", "key": var, "optional": True}, (path.name, var)
        assert "kind: Secret" not in path.read_text()


def test_raycluster_has_cpu_and_gpu_groups_and_a_shared_volume():
    rc = _load(K8S / "raycluster.yaml")["spec"]
    assert rc["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert rc["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = _groups(rc)
    assert "nvidia.com/gpu" not in _limits(groups["cpu"]) and _limits(groups["gpu"])["nvidia.com/gpu"] == "1"
    assert groups["gpu"]["template"]["spec"]["containers"][0]["image"].endswith("-cuda")
    for spec in [rc["headGroupSpec"], *groups.values()]:  # the same RWX claim at the same path everywhere
        pod = spec["template"]["spec"]
        vols = {v["name"]: v for v in pod["volumes"]}
        assert vols["shared"]["persistentVolumeClaim"]["claimName"] == "mimflow-shared"
        assert {"name": "shared", "mountPath": "/mnt/mimflow"} in pod["containers"][0]["volumeMounts"]


def _entrypoint(job) -> tuple[str, str, list[str]]:
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:2] == ["python", "-m"] and words[3] == "--config", words
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    assert len(words) == 5 + 2 * len(sets), f"unexpected arguments in {words}"
    return words[2], words[4], sets


def _stage_config(module: str, recipe: str, sets: list[str]):
    if module == "tokenizer":
        from tokenizer.stage1 import load_stage1_config

        return load_stage1_config(recipe, sets)
    from pipeline.config import load_config

    if module == "pretrain":
        from pretrain.config import PretrainConfig as cls
    else:
        from eval.eval_config import EvalConfig as cls
    return load_config(cls, recipe, sets)


def test_rayjob_entrypoints_use_real_recipes_on_the_right_workers():
    jobs = {s: _load(K8S / f"rayjob-{s}.yaml") for s in ("tokenize", "pretrain", "eval")}
    for stage, job in jobs.items():
        module, recipe, sets = _entrypoint(job)
        assert module == {"tokenize": "tokenizer"}.get(stage, stage)
        assert "demo" not in recipe, f"{stage}: the demo recipes are 64-px toys"
        cfg = _stage_config(module, recipe, sets)  # unknown keys and bad values raise here
        for kv in sets:  # every data location is an object-store URI
            key, _, value = kv.partition("=")
            if key.split(".")[-1] in ("source", "out", "tokens", "tokenizer", "encoder", "train_source", "test_source"):
                assert value.startswith("s3://"), kv
        renv = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
        assert renv["env_vars"]["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
        assert "working_dir" not in renv
        groups = _groups(job["spec"]["rayClusterSpec"])
        gpus = sum(g["replicas"] * int(_limits(g).get("nvidia.com/gpu", 0)) for g in groups.values())
        if stage == "tokenize":
            tok = cfg.tokenizer
            assert tok.model.input_size == 224 and tok.use_gpu and tok.num_workers == gpus
            assert "cpu" in groups and cfg.tokens.views >= 1
        elif stage == "pretrain":
            assert cfg.data.img_size == 224 and cfg.use_gpu and cfg.workers == gpus
            assert all(int(_limits(g)["cpu"]) >= cfg.cpus_per_worker for g in groups.values())
        else:
            assert gpus == 0 and "nvidia.com/gpu" not in (K8S / "rayjob-eval.yaml").read_text()
            # the driver (decoding, features) runs on the CPU worker, not on the head (num-cpus 0)
            assert 0 < job["spec"]["entrypointNumCpus"] <= int(_limits(groups["cpu"])["cpu"])
            run_name = dict(kv.split("=", 1) for kv in _entrypoint(jobs["pretrain"])[2])["run_name"]
            assert cfg.encoder.endswith(f"/runs/{run_name}/encoder")  # stage 2 exports to <out>/<run_name>/encoder
        assert isinstance(job["spec"]["shutdownAfterJobFinishes"], bool)


# --------------------------------------------------------------------------------------------------
# Cluster launcher and containers


def test_cluster_launcher_auth_and_images():
    doc = _load(LAUNCHER)
    head_cmd = " ".join(doc["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_cmd and "--dashboard-host=127.0.0.1" in head_cmd
    assert "RAY_AUTH_MODE=token" in " ".join(doc["worker_start_ray_commands"])
    for remote, local in doc.get("file_mounts", {}).items():  # the token comes from outside the repo
        assert local.startswith(("~/", "/")), local
    assert doc["docker"]["image"].endswith("-cuda") and not doc["docker"]["head_image"].endswith("-cuda")


def _dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in (REPO / "infra/docker" / name).read_text().splitlines()
                                         if not l.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^(\w+)\s+(.*)$", text, re.M)]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_works_with_the_launcher_and_checks_the_installed_package(name):
    ins = _dockerfile(name)
    kinds = [k for k, _ in ins]
    assert "ENTRYPOINT" not in kinds, "`docker run IMAGE bash` (the cluster launcher) must run bash"
    runs = " ".join(a for k, a in ins if k == "RUN")
    assert re.search(r"apt-get install[^&]*\brsync\b", runs), "the launcher syncs file_mounts with rsync"
    user = [a for k, a in ins if k == "USER"][-1]
    useradd = next(s.split() for k, a in ins if k == "RUN" for s in a.split("&&") if s.strip().startswith("useradd"))
    assert "--create-home" in useradd and useradd[useradd.index("--home-dir") + 1] == f"/home/{user}" and useradd[-1] == user
    assert ("ENV", f"HOME=/home/{user}") in ins
    # every package of pyproject is copied and installed
    include = re.search(r"include\s*=\s*\[([^\]]*)\]", (REPO / "pyproject.toml").read_text()).group(1)
    for pkg in [p.strip().strip('"').rstrip("*") for p in include.split(",") if p.strip()]:
        assert any(k == "COPY" and a.startswith(f"{pkg} ") for k, a in ins), f"{name} does not COPY {pkg}/"
    # the import check runs outside the source tree, after it is gone, and asserts site-packages
    install = next(a for k, a in ins if k == "RUN" and re.match(r"pip install \.( |$)", a))
    src = [a for k, a in ins if k == "WORKDIR"][0]
    steps = [s.strip() for s in install.split("&&")]
    i_cd, i_rm = steps.index("cd /"), steps.index(f"rm -rf {src}")
    i_check = next(i for i, s in enumerate(steps) if s.startswith("python -c") and "import" in s)
    assert i_cd < i_check and i_rm < i_check and "purelib" in steps[i_check]
    assert "faiss-gpu" not in runs and ".[gpu" not in runs  # faiss-gpu on PyPI is a CUDA 12 build


def test_cuda_image_has_one_cuda_stack():
    ins = _dockerfile("Dockerfile.cuda")
    base = [a for k, a in ins if k == "FROM"]
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    assert args["TORCH_CUDA"] == TORCH_WHEEL_CUDA and f"torch=={TORCH_VERSION}" in args["TORCH_SPEC"]
    for image in base:  # a CUDA base image must carry torch's CUDA, else it is a second stack
        m = re.search(r"nvidia/cuda:(\d+\.\d+)", image)
        assert m is None or m.group(1) == TORCH_WHEEL_CUDA, image
    assert len(base) == 1 and base[0] == [a for k, a in _dockerfile("Dockerfile") if k == "FROM"][0]  # same Python
    runs = " ".join(a for k, a in ins if k == "RUN")
    assert "torch.version.cuda.startswith('${TORCH_CUDA}')" in runs  # the build fails on another CUDA
    ignore = (REPO / ".dockerignore").read_text().split()
    for must in (".git", ".venv", "runs", "demo-out", ".env", "**/auth_token"):
        assert must in ignore, must
