"""The Kubernetes side of a multi-node run, rendered from a run config.

    python -m infra.k8s.render configs/infinitevl_4b.yaml --set launch.nnodes=2 --image REGISTRY/infinitevl:TAG \\
        -- infinitevl run configs/infinitevl_4b.yaml --set launch.nnodes=2 | kubectl create -f -

prints the headless Service of the rendezvous (create it once per namespace) and the indexed Job that Prefect's
Kubernetes worker would create from gpu-job-template.json for a flow run: `launch.nnodes` pods of
`launch.nproc_per_node` GPUs each. Pod 0 runs the command and hosts the rendezvous store; the others follow it
(pipeline/multinode.py). With Prefect, the work pool renders the same template itself: `job_variables(config)`
is what a deployment or a run passes (`prefect deployment run ... --job-variable nodes=2 --job-variable gpus=8`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATE = os.path.join(HERE, "gpu-job-template.json")
SERVICE = os.path.join(HERE, "rendezvous-service.json")


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def job_variables(config, image: str | None = None) -> dict:
    """The work pool's variables that follow from a run config."""
    from pipeline.multinode import gpus_per_node

    values = {"nodes": config.launch.nnodes, "gpus": gpus_per_node(config)}
    if image:
        values["image"] = image
    return values


def render_job(values: dict, command: list[str] | None = None, template: dict | None = None) -> dict:
    """The Job manifest the Prefect Kubernetes worker creates for a flow run: the template's defaults under
    `values`, placeholders without a value dropped (Prefect's own templating), the environment as a list and the
    command as the container's arguments (as the worker puts them)."""
    from prefect.utilities.templating import apply_values

    template = copy.deepcopy(template or load(TEMPLATE))
    defaults = {name: spec["default"] for name, spec in template["variables"]["properties"].items()
                if spec.get("default") is not None}
    variables = {**defaults, **values}
    if command is not None:
        variables["command"] = shlex.join(command)
    configuration = apply_values(template["job_configuration"], variables)
    manifest = configuration["job_manifest"]
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    env = configuration.get("env") or {}
    container["env"] = [{"name": k, "value": str(v)} for k, v in env.items()] if isinstance(env, dict) else env
    if isinstance(container.get("args"), str):
        container["args"] = shlex.split(container["args"])
    return manifest


def render_service(namespace: str | None = None, name: str | None = None, port: int | None = None) -> dict:
    """The headless Service that gives each pod of a Job `<job>-<index>.<name>` (its selector: the label the
    template puts on the pods)."""
    service = load(SERVICE)
    if name:
        service["metadata"]["name"] = name
        service["spec"]["selector"] = {"infinitevl.io/rendezvous": name}
    if port:
        service["spec"]["ports"][0].update(port=port, targetPort=port)
    if namespace:
        service["metadata"]["namespace"] = namespace
    return service


def main(argv: list[str] | None = None) -> None:
    import yaml

    from pipeline.config import load_config

    parser = argparse.ArgumentParser(prog="python -m infra.k8s.render", description=__doc__,
                                     usage="%(prog)s CONFIG [--set k=v ...] [--image IMAGE] -- COMMAND ...",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="section.field=value")
    parser.add_argument("--image", help="an image with this repository set up (infra/setup.sh) and CUDA torch")
    parser.add_argument("--namespace", default="default")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args, command = parser.parse_args(argv[:split]), argv[split + 1:]
    if not command:
        parser.error("give the command pod 0 runs after --, e.g. -- infinitevl run CONFIG")
    config = load_config(args.config, args.overrides)
    values = {**job_variables(config, args.image), "namespace": args.namespace, "name": config.run.name}
    docs = [render_service(args.namespace), render_job(values, command)]
    yaml.safe_dump_all(docs, sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main()
