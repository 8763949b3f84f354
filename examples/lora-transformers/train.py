"""fedkube LoRA example: a tiny causal LM whose LoRA adapter is federated with FedAvg; the base never travels.

Each site holds text of its own domain (data.py). Every round it receives the
global adapter into its network (``fk.receive(into=net.state_dict())`` writes
only the adapter's tensors, in place), measures the perplexity of that global
model on its held-out text, trains the adapter for STEPS_PER_ROUND steps and
sends back only the adapter. The perplexities are logged with
``fk.log_metric`` and returned in the result's metrics.
"""

from __future__ import annotations

import data
import torch

import fedkube.trainer_sdk as fk


def main() -> None:
    site = fk.site() or data.SITES[0]
    if site not in data.SITES:
        raise SystemExit(f"site {site!r} has no text domain; fix: name the job's clients {', '.join(data.SITES)}")
    train_tokens, test_tokens = data.site_tokens(site)
    net = data.make_model()  # the same seeded base and initial adapter on every site
    n_adapter = sum(t.numel() for t in data.adapter(net).values())
    n_all = sum(p.numel() for p in net.parameters())
    print(f"site {site}: {n_adapter:,} of {n_all:,} parameters are the adapter; only those are sent")
    fk.init()
    while fk.is_running():
        task = fk.receive(into=net.state_dict())
        if task.params is None:
            # Round 0 (model source firstClient): this site supplies the initial adapter, untrained (lora_B is 0,
            # so the model starts as the base).
            fk.send(fk.FLModel(params=data.adapter(net), num_examples=data.TRAIN_SENTENCES))
            continue
        global_ppl = data.perplexity(net, test_tokens)
        seed = 1000 * task.round + data.SITES.index(site)
        loss = data.train_steps(net, train_tokens, steps=data.STEPS_PER_ROUND, seed=seed)
        local_ppl = data.perplexity(net, test_tokens)
        print(
            f"site {site} round {task.round}/{task.total_rounds}: global model perplexity {global_ppl:.3f}, "
            f"after local training {local_ppl:.3f} (train loss {loss:.4f})"
        )
        fk.log_metric("global_perplexity", global_ppl)
        fk.log_metric("local_perplexity", local_ppl)
        metrics = {"global_perplexity": global_ppl, "local_perplexity": local_ppl, "loss": loss}
        fk.send(fk.FLModel(params=data.adapter(net), num_examples=data.TRAIN_SENTENCES, metrics=metrics))


if __name__ == "__main__":
    torch.set_num_threads(1)  # a tiny model: one thread per trainer avoids oversubscribing the CPU
    main()
