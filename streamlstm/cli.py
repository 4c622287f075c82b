"""The `streamlstm` command: broker, train, import, serve, predict, demo.

Problems the user can fix (config, model artifact, input files) end the command with exit code 2 and
one line naming the file or key; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from .config import load_config
from .errors import UsageError
from .logs import configure_logging
from .signals import on_stop_signals

USAGE_ERROR = 2


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    if args.check:
        from .serving.models import load_models

        artifact, shadow = load_models(cfg)
        checked = {"config": str(args.config), "model": str(artifact.path), "version": artifact.version}
        if shadow is not None:
            checked |= {"shadow": str(shadow.path), "shadow_version": shadow.version}
        print(json.dumps(checked))
        return 0
    configure_logging(cfg.log.level, cfg.log.format)
    if cfg.serve.workers > 1:
        from .serving import (
            worker,  # imports no torch itself: the supervisor's process stays without it
        )
        from .serving.supervisor import serve_workers

        return serve_workers(cfg, worker.work, worker.load_model)
    from .serving.daemon import Daemon

    daemon = Daemon(cfg)
    on_stop_signals(daemon.stop)
    daemon.run()
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    configure_logging(cfg.log.level, cfg.log.format)
    from .training.data import read_kafka
    from .training.train import train

    data = read_kafka(cfg.kafka, args.topic) if args.topic else args.data
    artifact = train(data, args.out, cfg.train, log=lambda line: print(line, file=sys.stderr, flush=True),
                     progress=sys.stderr if sys.stderr.isatty() else None, resume=args.resume)
    print(json.dumps({"model": str(args.out), "version": artifact.version, "training": artifact.training}))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from .model.importer import import_weights

    version = import_weights(args.weights, args.out, _names(args.features) or [], _names(args.outputs), args.task,
                             args.stats, args.prefix)
    print(json.dumps({"model": str(args.out), "version": version}))
    return 0


def _names(text: str | None) -> list[str] | None:
    """A comma-separated list of names, or None when not given."""
    return [name.strip() for name in text.split(",") if name.strip()] if text else None


def cmd_predict(args: argparse.Namespace) -> int:
    from .training.predict import predict_file

    cfg = load_config(args.config, args.set)
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    try:
        scored, rejected = predict_file(args.model, args.data, out, cfg.events, cfg.state.dtype)
    finally:
        if args.out:
            out.close()
    print(f"{scored} events scored, {rejected} rejected", file=sys.stderr)
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    from .demo.broker import EmbeddedBroker

    stop = threading.Event()
    on_stop_signals(stop.set)
    with EmbeddedBroker(args.port) as broker:
        print(f"embedded broker listening; bootstrap servers: {broker.bootstrap}", flush=True)
        while not stop.wait(0.5):
            if not broker.running():
                print("embedded broker exited unexpectedly", file=sys.stderr)
                return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo.run import run_demo

    return run_demo(Path(args.workdir) if args.workdir else None, Path(args.picture) if args.picture else None)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamlstm", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser, required: bool) -> None:
        sp.add_argument("--config", required=required, help="YAML file (see config/streamlstm.yaml)")
        sp.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one key; repeatable; wins over the file and STREAMLSTM_* variables")

    serve = sub.add_parser("serve", help="run the daemon")
    with_config(serve, required=True)
    serve.add_argument("--check", action="store_true", help="check the configuration and the model it names, "
                       "then exit (0: both load; 2: the line says what is wrong); no Kafka is contacted")
    serve.set_defaults(func=cmd_serve)

    train = sub.add_parser("train", help="train a model artifact from an event file or a Kafka topic")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="JSONL events (the wire format plus 'key'), or a .csv file (train.csv_*)")
    source.add_argument("--topic", help="Kafka topic of events, read from the beginning to its current end "
                        "(kafka.bootstrap_servers and security settings from the config)")
    train.add_argument("--out", required=True, help="model directory to write")
    train.add_argument("--resume", action="store_true",
                       help="continue the interrupted run of the same data and settings from its checkpoint")
    with_config(train, required=False)
    train.set_defaults(func=cmd_train)

    imp = sub.add_parser("import", help="turn a plain PyTorch LSTM (nn.LSTM + nn.Linear head) into a model artifact")
    imp.add_argument("--weights", required=True, help="its state_dict: .safetensors, or a torch file (weights_only)")
    imp.add_argument("--out", required=True, help="model directory to write")
    imp.add_argument("--features", required=True, help="the input features' names, in the LSTM's input order: a,b,c")
    imp.add_argument("--outputs", help="the head's outputs: target features (regression) or classes")
    imp.add_argument("--task", default="regression", choices=["regression", "classification"])
    imp.add_argument("--stats", help="JSON: feature_mean, feature_std (and target_mean, target_std) the model "
                     "was trained with; default: none (raw features, as the tutorials train)")
    imp.add_argument("--prefix", default="", help="a prefix of every parameter name to strip first (e.g. model.)")
    imp.set_defaults(func=cmd_import)

    predict = sub.add_parser("predict", help="score a JSONL event file offline, as the daemon would")
    predict.add_argument("--model", required=True, help="model directory")
    predict.add_argument("--data", required=True, help="JSONL events: the wire format plus 'key'")
    predict.add_argument("--out", help="JSONL predictions (default: standard output)")
    with_config(predict, required=False)  # events: rejected or replaced as the daemon does; state.dtype's rounding
    predict.set_defaults(func=cmd_predict)

    broker = sub.add_parser("broker", help="run the embedded Kafka-compatible broker on 127.0.0.1")
    broker.add_argument("--port", type=int, default=9092)
    broker.set_defaults(func=cmd_broker)

    demo = sub.add_parser("demo", help="broker + training + daemon + replay of a real data set, then a summary")
    demo.add_argument("--workdir", help="keep the demo's files here (default: a temporary directory)")
    demo.add_argument("--picture", help="the PNG of a few series' forecasts (default: forecasts.png in --workdir, "
                      "else streamlstm-demo.png here)")
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"streamlstm {args.command}: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except FileNotFoundError as exc:
        print(f"streamlstm {args.command}: {exc.filename}: file not found", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
