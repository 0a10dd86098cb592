"""Operations tooling for mimflow: a loopback Ray head for laptops and tests, a `ray job submit`
wrapper for every stage, and deployment manifests (KubeRay, cluster launcher, containers).

Nothing here is imported by the stages themselves; see docs/DEPLOY.md.
"""
