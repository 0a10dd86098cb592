"""Check the deployment manifests against their schemas, as `kubectl apply --validate=strict` and
`ray up` would: KubeRay's ray.io/v1 resources against infra/schemas/ (transcribed from KubeRay's API
types, see its README), cluster-launcher YAMLs against the schema inside the installed ray package.

    python -m infra.manifest_check                  # every infra/k8s/*.yaml and infra/cluster-launcher/*.yaml
    python -m infra.manifest_check path.yaml ...
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any, Iterable

import yaml

INFRA = Path(__file__).resolve().parent
KUBERAY_SCHEMA = INFRA / "schemas" / "kuberay-ray.io-v1.schema.json"


@functools.lru_cache(maxsize=None)
def _validator(which: str):
    import jsonschema

    if which == "launcher":
        import ray

        schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    else:  # a kind in the KubeRay schema: validate against its definition
        schema = json.loads(KUBERAY_SCHEMA.read_text())
        if which not in schema["$defs"]:
            return None
        schema = dict(schema, **{"$ref": f"#/$defs/{which}"})
    return jsonschema.validators.validator_for(schema)(schema)


def _messages(validator, doc: Any) -> list[str]:
    out = []
    for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        where = "/".join(map(str, e.absolute_path)) or "(top level)"
        out.append(f"{where}: {e.message}")
    return out


def manifest_errors(doc: Any) -> list[str]:
    """Schema errors of one parsed YAML document (a KubeRay resource or a cluster-launcher config)."""
    if not isinstance(doc, dict):
        return [f"(top level): expected a mapping, got {type(doc).__name__}"]
    if "apiVersion" in doc or "kind" in doc:
        if doc.get("apiVersion") != "ray.io/v1":
            return [f"apiVersion: {doc.get('apiVersion')!r} is not ray.io/v1 (no schema for it here)"]
        validator = _validator(str(doc.get("kind")))
        if validator is None:
            return [f"kind: {doc.get('kind')!r} is not a KubeRay kind this schema covers (RayCluster, RayJob)"]
        return _messages(validator, doc)
    return _messages(_validator("launcher"), doc)


def check_files(paths: Iterable[Path]) -> list[str]:
    """One line per problem: `file: where: message`."""
    problems = []
    for path in paths:
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except yaml.YAMLError as e:
            problems.append(f"{path}: not valid YAML: {e}".replace("\n", " "))
            continue
        for doc in docs:
            problems += [f"{path}: {m}" for m in manifest_errors(doc)]
    return problems


def default_paths() -> list[Path]:
    return sorted((INFRA / "k8s").glob("*.yaml")) + sorted((INFRA / "cluster-launcher").glob("*.yaml"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.manifest_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, help="YAML files (default: every manifest under infra/)")
    args = parser.parse_args(argv)
    paths = args.paths or default_paths()
    problems = check_files(paths)
    for p in problems:
        print(p, file=sys.stderr)
    print(f"{len(paths)} manifests checked, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
