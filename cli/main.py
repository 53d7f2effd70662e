"""The ``mmfuse`` command: run the local stack, a gateway, a worker pool, or make a test checkpoint."""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mmfuse.shared.celery_app import POOLS

if TYPE_CHECKING:
    from mmfuse.cli.stack import LocalStack
    from mmfuse.shared.schema import Modality

DEFAULT_VAR_DIR = Path("var")


def demo_image() -> bytes:
    """A red disc on a white square, drawn with Pillow."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (224, 224), "white")
    ImageDraw.Draw(image).ellipse((40, 40, 184, 184), fill=(220, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


DEMO_AUDIO_SECONDS = 3.0
DEMO_AUDIO_SAMPLE_RATE = 48_000  # CLAP's rate: the worker decodes the clip without resampling


def demo_audio() -> bytes:
    """A 3 s chirp (a sine sweeping up from 200 Hz to 2 kHz) as a 16-bit mono WAV file, written with
    soundfile."""
    import numpy as np
    import soundfile

    start_hz, end_hz = 200.0, 2000.0
    t = np.arange(int(DEMO_AUDIO_SECONDS * DEMO_AUDIO_SAMPLE_RATE)) / DEMO_AUDIO_SAMPLE_RATE
    # A linear sweep's phase is the integral of its frequency, start + (end - start) t / T.
    phase = 2 * np.pi * (start_hz * t + (end_hz - start_hz) * t**2 / (2 * DEMO_AUDIO_SECONDS))
    buffer = io.BytesIO()
    soundfile.write(buffer, 0.5 * np.sin(phase), DEMO_AUDIO_SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


DEMO_TEXTS = ["a red circle on a white background", "a rising whistle"]
DEMO_LABELS = ["red circle", "whistle", "dog"]
DEMO_MODALITIES: tuple[Modality, ...] = ("image", "text", "audio")


def demo_options(models: Mapping[str, str], modalities: Sequence[Modality] = DEMO_MODALITIES) -> dict:
    """What the demo job (an image, two texts and an audio clip, or those of ``modalities``) asks for: what
    the models of its modalities (``Settings.models()``, each an embedding space) can answer, by the rules
    the gateway checks a job with (``shared.spaces.JobShape.check``). Fusion by ``mean`` when the job is in
    one space, else ``concat`` (a CLIP image with a CLAP clip always is); ``similarity`` when two of its
    modalities can be compared (audio with texts through CLAP's own text tower); ``classify`` when every item
    can be compared with the labels."""
    from mmfuse.shared.spaces import JobShape, SpaceError

    counts: dict[Modality, int] = {
        "image": 1 if "image" in modalities else 0,
        "text": len(DEMO_TEXTS) if "text" in modalities else 0,
        "audio": 1 if "audio" in modalities else 0,
    }
    spaces: dict[str, str] = {modality: models[modality] for modality in modalities}

    def allowed(options: dict) -> bool:
        labels = len(options.get("labels", ()))
        try:
            JobShape(counts, labels, options["outputs"], options["fusion"], {}, spaces).check()
        except SpaceError:
            return False
        return True

    options: dict = {"outputs": ["embeddings"], "fusion": "mean"}
    if not allowed(options):
        options["fusion"] = "concat"
    for output, extra in (("similarity", {}), ("classify", {"labels": DEMO_LABELS})):
        candidate = {**options, **extra, "outputs": [*options["outputs"], output]}
        if allowed(candidate):
            options = candidate
    return options


def demo_job(models: Mapping[str, str], modalities: Sequence[Modality] = DEMO_MODALITIES) -> dict:
    """The demo job's JSON body: its items of ``modalities`` (files as base64) and :func:`demo_options`."""
    body: dict = {}
    if "image" in modalities:
        body["images"] = [base64.b64encode(demo_image()).decode()]
    if "text" in modalities:
        body["texts"] = DEMO_TEXTS
    if "audio" in modalities:
        body["audios"] = [base64.b64encode(demo_audio()).decode()]
    return {**body, **demo_options(models, modalities)}


ENDED = ("succeeded", "failed", "canceled")


def submit_and_wait(gateway_url: str, api_key: str, body: dict, timeout_s: float = 120) -> dict:
    """POST the job and wait for it to end: in the same request (``Prefer: wait``) when it ends within the
    server's wait cap, else by long-polling its URL. Plain HTTP (requests), as any client could."""
    import requests

    deadline = time.monotonic() + timeout_s
    with requests.Session() as http:
        http.headers["Authorization"] = f"Bearer {api_key}"
        answer = http.post(f"{gateway_url}/v1/jobs", json=body, headers={"Prefer": "wait=30"}, timeout=60)
        while True:
            if not answer.ok:  # the API's error body says why (e.g. 422 incompatible_embedding_spaces)
                raise RuntimeError(f"demo job: {answer.status_code} {answer.text}")
            job = answer.json()
            if job["status"] in ENDED:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"demo job {job['id']} did not end within {timeout_s:g} s")
            answer = http.get(f"{gateway_url}/v1/jobs/{job['id']}", params={"wait": 30}, timeout=60)


def _rounded(values: Sequence[float], digits: int = 4) -> list[float]:
    return [round(value, digits) for value in values]


def run_demo(gateway_url: str, api_key: str, models: Mapping[str, str]) -> dict:
    """Run the demo job (:func:`demo_job`) on the stack at ``gateway_url`` and print what it answered."""
    body = demo_job(models)
    started = time.monotonic()
    job = submit_and_wait(gateway_url, api_key, body)
    elapsed = time.monotonic() - started
    print(f"\ndemo job {job['id']}: {job['status']} in {elapsed * 1000:.0f} ms (submit -> result)")
    print(f"  asked for {', '.join(body['outputs'])}, fused by {body['fusion']}")
    if job["status"] != "succeeded":
        print(json.dumps(job.get("error"), indent=2))
        return job
    result = job["result"]
    embeddings = result["embeddings"]
    print(
        "  stages: "
        + ", ".join(f"{name} {stage['duration_s'] * 1000:.1f} ms" for name, stage in job["timings"]["stages"].items())
    )
    spaces = embeddings.get("spaces", {})
    for items in ("images", "texts", "audios"):
        if embeddings.get(items):
            vector = embeddings[items][0]
            space = f" in {spaces[items]}" if items in spaces else ""
            print(f"  {items[:-1]} embedding{space}: dim {len(vector)}, first values {_rounded(vector[:4])}")
    print(f"  fused ({embeddings['fusion']}): dim {len(embeddings['fused'])}")
    if "similarity" not in result:
        print("  (no two of the job's modalities in one embedding space: no similarity)")
    for pair, matrix in result.get("similarity", {}).items():
        rows, columns = pair.split("_")
        print(f"  cosine({rows}, {columns}): {[_rounded(row) for row in matrix]}")
    classify = result.get("classify")
    if classify is None:
        print("  (labels not comparable with every item of the job: no zero-shot scores)")
        return job
    for items in ("images", "texts", "audios"):
        for top in classify.get(items, [])[:1]:
            scores = dict(zip(classify["labels"], _rounded(top["scores"]), strict=True))
            print(f"  zero-shot {items[:-1]}: {top['label']!r} {scores}")
    return job


def describe_torch_threads(stack: LocalStack) -> str:
    """One line: each encoder pool's torch threads and how they were chosen."""
    from mmfuse.cli.stack import ENCODER_POOLS
    from mmfuse.shared.cpus import read_cpu_budget

    parts = []
    for pool in (pool for pool in ENCODER_POOLS if stack.pool_processes(pool)):
        layout = stack.process_threads(pool)
        part = f"{pool} {sum(layout)}"
        if len(layout) > 1:
            part += f" in {len(layout)} processes ({'+'.join(map(str, layout))})"
        if pool in stack.cpu_shares:
            part += f" (MMFUSE_CPU_SHARE={stack.cpu_shares[pool]:.2f}, by tower cost)"
        parts.append(part)
    setting = stack.settings().torch_threads
    return f"torch threads: {', '.join(parts)}; MMFUSE_TORCH_THREADS={setting}, {read_cpu_budget().describe()}"


# The size of the CLAP test checkpoint `mmfuse up` builds beside each CLIP one: tiny with tiny, the real
# model's shapes (clap-htsat-unfused's) with the real model's (ViT-B/32).
CLAP_SIZE_BESIDE = {"tiny": "tiny", "b32": "full"}


def cmd_up(args: argparse.Namespace) -> int:
    from mmfuse.cli.stack import LocalStack
    from mmfuse.shared.models import make_test_checkpoint

    env = {key: value for key, value in os.environ.items() if key.startswith("MMFUSE_")}
    var_dir = Path(args.var_dir).resolve()
    if "MMFUSE_MODEL" not in env:
        checkpoint = var_dir / "models" / f"clip-test-{args.test_size}"
        if not (checkpoint / "config.json").exists():
            make_test_checkpoint(checkpoint, args.test_size)
        env["MMFUSE_MODEL"] = str(checkpoint)
        print(
            f"No MMFUSE_MODEL set: using the local test checkpoint {checkpoint} "
            f"(CLIP-shaped, size {args.test_size}, random weights: scores are not meaningful).\n"
            f"Set MMFUSE_MODEL=openai/clip-vit-base-patch32 where the Hugging Face hub is reachable."
        )
    if "MMFUSE_AUDIO_MODEL" not in env:
        clap_size = CLAP_SIZE_BESIDE[args.test_size]
        checkpoint = var_dir / "models" / f"clap-test-{clap_size}"
        if not (checkpoint / "config.json").exists():
            make_test_checkpoint(checkpoint, clap_size, 0, kind="clap")
        env["MMFUSE_AUDIO_MODEL"] = str(checkpoint)
        print(
            f"No MMFUSE_AUDIO_MODEL set: using the local test checkpoint {checkpoint} "
            f"(CLAP-shaped, size {clap_size}, random weights: scores are not meaningful).\n"
            f"Set MMFUSE_AUDIO_MODEL=laion/clap-htsat-unfused where the Hugging Face hub is reachable."
        )
    # A local stack serves this machine only, and its logs are read by people (var/logs/*.log).
    env.setdefault("MMFUSE_GATEWAY_BIND", "127.0.0.1:8080")
    env.setdefault("MMFUSE_LOG_FORMAT", "text")
    # The local stack delivers webhooks to receivers on this machine; production admits none by default.
    env.setdefault("MMFUSE_WEBHOOK_ALLOW_NETWORKS", "127.0.0.0/8 ::1/128")
    if "MMFUSE_WEBHOOK_SECRETS" not in env:
        from mmfuse_client.webhooks import generate_secret

        env["MMFUSE_WEBHOOK_SECRETS"] = generate_secret()
        print(f"webhook signing secret for this run: {env['MMFUSE_WEBHOOK_SECRETS']}")
    stack = LocalStack(var_dir=var_dir, env=env)
    # Stop the stack on SIGTERM too (and on Ctrl-C even where the shell started us with SIGINT ignored).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        print("starting redis (if absent), S3 (if absent), gateway, workers and beat ...", flush=True)
        started = time.monotonic()
        stack.start()
        print(
            f"stack ready in {time.monotonic() - started:.1f} s: gateway {stack.gateway_url}, logs in {stack.log_dir}"
        )
        print(describe_torch_threads(stack))
        api_key = stack.create_api_key("local")
        print(f"API key for this stack (send 'Authorization: Bearer <key>'): {api_key}")
        job = run_demo(stack.gateway_url, api_key, stack.settings().models())
        if args.exit_after_demo:
            return 0 if job["status"] == "succeeded" else 1
        print(
            f"\nmmfuse is up at {stack.gateway_url} (Ctrl-C to stop). Try:\n"
            f"  curl -s -X POST {stack.gateway_url}/v1/jobs -H 'authorization: Bearer {api_key}' "
            f"-H 'content-type: application/json' "
            f'-d \'{{"texts": ["hello"]}}\''
        )
        # A process that exits is restarted (its log says so); only a crash loop ends the stack.
        while not stack.failed.wait(1):
            pass
        print(f"stopping the stack: {stack.failure}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stack.stop()


def cmd_gateway(args: argparse.Namespace) -> int:
    from mmfuse.cli.stack import gateway_command
    from mmfuse.shared.settings import get_settings

    settings = get_settings()
    command = gateway_command(
        args.bind or settings.gateway_bind,
        args.workers or settings.gateway_workers,
        args.threads or settings.gateway_threads,
    )
    os.execvp(command[0], command)


def cmd_worker(args: argparse.Namespace) -> int:
    from mmfuse.cli.stack import default_concurrency, worker_command
    from mmfuse.shared.settings import get_settings

    settings = get_settings()
    concurrency = args.concurrency or default_concurrency(args.pool, settings)
    command = worker_command(args.pool, concurrency, settings.log_level)
    os.execvp(command[0], command)


def cmd_beat(args: argparse.Namespace) -> int:
    from mmfuse.cli.stack import beat_command
    from mmfuse.shared.settings import get_settings

    command = beat_command(get_settings().log_level)
    os.execvp(command[0], command)


def _key_store():
    from mmfuse.shared.apikeys import KeyStore
    from mmfuse.shared.settings import get_settings
    from mmfuse.shared.stores import connect

    return KeyStore(connect(get_settings().redis_url))


def cmd_keys(args: argparse.Namespace) -> int:
    store = _key_store()
    if args.keys_command == "create":
        plaintext, record = store.create(args.name, args.rate, args.burst)
        print(f"created key {record.id} ({record.name}); it is shown only now:\n{plaintext}")
    elif args.keys_command == "list":
        for record in store.list():
            revoked = time.strftime("%Y-%m-%d %H:%M", time.gmtime(record.revoked_at or 0))
            state = "active" if record.active else f"revoked {revoked}"
            limit = f" rate {record.rate_per_s:g}/s burst {record.burst}" if record.rate_per_s is not None else ""
            created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(record.created_at))
            print(f"{record.id}  {record.name:<20} created {created}  {state}{limit}")
    elif args.keys_command == "revoke":
        if not store.revoke(args.key_id):
            print(f"no active key {args.key_id}", file=sys.stderr)
            return 1
        print(f"revoked {args.key_id}")
    return 0


def cmd_make_test(args: argparse.Namespace) -> int:
    from mmfuse.shared.models import TEST_CHECKPOINT_SIZES, make_test_checkpoint

    sizes = sorted(TEST_CHECKPOINT_SIZES[args.kind])
    if args.size not in sizes:
        print(f"mmfuse models make-test: --size of --kind {args.kind} is one of {', '.join(sizes)}", file=sys.stderr)
        return 2
    path = make_test_checkpoint(args.directory, args.size, args.seed, args.kind)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mmfuse.shared.models import TEST_CHECKPOINT_SIZES, TEST_SIZES  # no torch import: models loads it lazily

    parser = argparse.ArgumentParser(prog="mmfuse", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run the local stack and a demo job")
    up.add_argument("--var-dir", default=str(DEFAULT_VAR_DIR), help="logs, Redis data, test checkpoints")
    up.add_argument(
        "--test-size",
        default="tiny",
        choices=sorted(TEST_SIZES),
        help="test checkpoint size when MMFUSE_MODEL is unset",
    )
    up.add_argument("--exit-after-demo", action="store_true", help="stop the stack after the demo job")
    up.set_defaults(func=cmd_up)

    # Logging of the servers: MMFUSE_LOG_LEVEL and MMFUSE_LOG_FORMAT (shared/logs.py), for every command.
    gateway = commands.add_parser("gateway", help="run the HTTP gateway (gunicorn)")
    gateway.add_argument("--bind", default=None, help="HOST:PORT (default: MMFUSE_GATEWAY_BIND, 0.0.0.0:8080)")
    gateway.add_argument("--workers", type=int, default=None, help="processes (default: MMFUSE_GATEWAY_WORKERS, 2)")
    gateway.add_argument(
        "--threads", type=int, default=None, help="threads per process (default: MMFUSE_GATEWAY_THREADS, 32)"
    )
    gateway.set_defaults(func=cmd_gateway)

    worker = commands.add_parser("worker", help="run one worker pool (Celery)")
    worker.add_argument("pool", choices=POOLS)
    worker.add_argument("--concurrency", type=int, default=0)
    worker.set_defaults(func=cmd_worker)

    beat = commands.add_parser("beat", help="run the scheduler of the maintenance tasks (celery beat; one only)")
    beat.set_defaults(func=cmd_beat)

    keys = commands.add_parser("keys", help="create, list and revoke API keys (in MMFUSE_REDIS_URL)")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="create a key and print it (once)")
    create.add_argument("--name", required=True)
    create.add_argument("--rate", type=float, default=None, help="jobs/s for this key (default: the service's)")
    create.add_argument("--burst", type=int, default=None)
    key_commands.add_parser("list", help="list keys (ids and names; no secrets)")
    revoke = key_commands.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    keys.set_defaults(func=cmd_keys)

    models = commands.add_parser("models", help="model utilities")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    make_test = model_commands.add_parser("make-test", help="write a deterministic CLIP or CLAP test checkpoint")
    make_test.add_argument("--kind", default="clip", choices=sorted(TEST_CHECKPOINT_SIZES))
    make_test.add_argument(
        "--size",
        default="tiny",
        choices=sorted({size for sizes in TEST_CHECKPOINT_SIZES.values() for size in sizes}),
        help="; ".join(f"{kind}: {', '.join(sizes)}" for kind, sizes in sorted(TEST_CHECKPOINT_SIZES.items())),
    )
    make_test.add_argument("--seed", type=int, default=0)
    make_test.add_argument("directory")
    make_test.set_defaults(func=cmd_make_test)

    # mmfuse embed: bulk embedding through the client; mmfuse heads: train and manage fusion heads
    from mmfuse.cli import embed, heads

    embed.add_parser(commands)
    heads.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
