"""A support desk on one base: three adapters, a tiny router, mixed batches.

    python examples/support_router.py                 # uses (or makes) out/demo/base, like `edgeadapt demo`
    python examples/support_router.py --base B --adapters D --engine numpy   # any base, PEFT folders D/<name>/

Tickets arrive; a keyword router picks the adapter for each (billing, tech, account, or none
for the general assistant); tickets are answered in batches where every row runs with its own
adapter in the same forward pass (live mode), and swapping costs nothing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import edgeadapt
from edgeadapt.converters.export_base import export_base
from edgeadapt.converters.peft.lora import convert_peft
from edgeadapt.cli.demo import adapter_folder, smollm2_gguf
from edgeadapt.formats.manifest import read_manifest

ROUTES = {  # adapter -> words that send a ticket there
    "billing": ("invoice", "charge", "refund", "payment", "card", "plan", "bill"),
    "tech": ("crash", "slow", "load", "sync", "error", "bug", "update", "stuck"),
    "account": ("password", "log in", "login", "sign in", "locked", "email", "account"),
}
TICKETS = [
    "Where is my invoice for October?",
    "The app crashes when I open the camera.",
    "I forgot my password and cannot log in.",
    "Why was my card charged twice this month?",
    "What are your opening hours?",
    "Sync has been stuck at 50% since yesterday.",
    "My account is locked after too many attempts.",
    "Can I get a refund for the annual plan?",
]


def route(ticket: str) -> str | None:
    """The adapter whose words the ticket uses most; None (the base) when none match."""
    text = ticket.lower()
    scores = {name: sum(w in text for w in words) for name, words in ROUTES.items()}
    best = max(scores, key=scores.get)
    return best if scores[best] else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("out/demo"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--base", type=Path, help="an exported base folder to run on (default: SmolLM2 in OUT/base)")
    ap.add_argument("--adapters", type=Path, help="a folder of PEFT folders billing/, tech/, account/ trained on "
                    "that base (default: examples/adapters)")
    a = ap.parse_args()
    base = a.base or a.out / "base"
    if a.base is None and not (base / "manifest.json").is_file():
        export_base(smollm2_gguf(), base, gguf_type="source")
    manifest = read_manifest(base)
    m = edgeadapt.load(base, engine=a.engine, mode="live")
    a.out.mkdir(parents=True, exist_ok=True)
    for name in ROUTES:
        folder = a.adapters / name if a.adapters else adapter_folder(name)
        m.add_adapter(convert_peft(folder, manifest, a.out / f"{name}.gguf", name=name))
    print(f"engine {m.engine}, mode {m.mode}, adapters {sorted(m.adapters)}\n")
    for i in range(0, len(TICKETS), a.batch):
        batch = TICKETS[i: i + a.batch]
        routes = [route(t) for t in batch]
        t0 = time.perf_counter()
        answers = m.generate(batch, max_new_tokens=a.max_new_tokens, adapters=routes)
        dt = time.perf_counter() - t0
        print(f"--- batch of {len(batch)} in one pass per token, {dt:.1f}s")
        for ticket, r, answer in zip(batch, routes, answers):
            print(f"[{r or 'general'}] {ticket}\n    {answer.strip()}")
        print()


if __name__ == "__main__":
    main()
