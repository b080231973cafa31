"""python -m pipeline.data corpus.yaml: build one corpus (a CorpusConfig in YAML); credentials from the env."""

from __future__ import annotations

import argparse
import json
import logging

from .build import build_corpus
from .config import CorpusConfig


def main() -> None:
    parser = argparse.ArgumentParser(description="Build one corpus into packed Arrow shards and a manifest.")
    parser.add_argument("config", help="a CorpusConfig as YAML (see pipeline/data/config.py)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    manifest = build_corpus(CorpusConfig.from_yaml(args.config))
    print(json.dumps({k: manifest[k] for k in ("name", "config_hash", "samples", "sequences", "tokens",
                                               "token_utilization", "quarantined")}, indent=2))


if __name__ == "__main__":
    main()
