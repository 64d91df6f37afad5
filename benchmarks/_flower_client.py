"""The Flower side of benchmarks/sim_flower_ray.py: its ClientApp and round metrics.

Flower's Ray backend sends the ClientApp to an actor with every message. Defined in
this importable module (Flower puts the driver's ``sys.path``, and so this directory,
on the actors' ``PYTHONPATH``), it travels by reference, and each actor process loads
the devices' data once (from fedkern's dataset cache) rather than receiving it with
every message: the pattern of Flower's own examples, which keep the partitioned data
set in a module-level cache.
"""
import functools
import os

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedkern import datasets, sim

#: devices in the federation (Flower supernodes)
DEVICES = 1000
#: the local training of every device, in both engines
LOCAL = sim.LocalTraining(epochs=1, batch_size=10, lr=0.01)

app = ClientApp()


@functools.cache
def federation() -> sim.FederatedDataset:
    """Synthetic(1,1) of FedProx over :data:`DEVICES` devices (loaded once per process)."""
    return datasets.fedprox_synthetic(1.0, 1.0, n_clients=DEVICES, seed=0)


@functools.cache
def model() -> sim.LogisticRegression:
    """The multinomial logistic regression both engines train."""
    data = federation().train
    return sim.LogisticRegression(data.n_features, data.n_classes)


def memory_mib(pid: int) -> tuple[float, float]:
    """Resident memory of process ``pid`` in MiB (Linux ``/proc``): all of it, and its
    anonymous part (heap and private pages; the rest maps files and shared memory, such
    as Ray's object store)."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return tuple(int(fields[key].split()[0]) / 2**10 for key in ("VmRSS", "RssAnon"))


@app.train()
def train(message: Message, context: Context) -> Message:
    """Supernode i trains fedkern's device i for one round with fedkern's compiled kernel."""
    client = int(context.node_config["partition-id"])
    server_round = int(message.content["config"]["server-round"])
    x, y = federation().train.client(client)
    params = message.content["arrays"].to_numpy_ndarrays()[0]
    delta = np.empty_like(params)
    result = model().train(params, x, y, LOCAL, np.random.default_rng([server_round, client]), delta)
    rss, anon = memory_mib(os.getpid())
    metrics = MetricRecord({"num-examples": len(y), "train-loss": float(result.loss), "pid": os.getpid(),
                            "rss-mib": rss, "anon-mib": anon})
    reply = RecordDict({"arrays": ArrayRecord([params + delta]), "metrics": metrics})
    return Message(reply, reply_to=message)


def round_metrics(replies: list[RecordDict], weighting: str) -> MetricRecord:
    """A round's train loss (mean weighted by ``weighting``, as fedkern's) and each
    actor's memory at its last reply (keys ``rss-PID`` and ``anon-PID``)."""
    metrics = [next(iter(reply.metric_records.values())) for reply in replies]
    weights = np.array([m[weighting] for m in metrics], float)
    loss = np.array([m["train-loss"] for m in metrics], float)
    out = MetricRecord({"train-loss": float(weights @ loss / weights.sum())})
    for m in metrics:
        out[f"rss-{m['pid']}"], out[f"anon-{m['pid']}"] = m["rss-mib"], m["anon-mib"]
    return out
