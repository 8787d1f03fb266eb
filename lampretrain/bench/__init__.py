"""Benchmarks printing JSON lines (``lampretrain bench KIND``): the module of each kind."""

BENCHES = {
    "prep": "lampretrain.bench.prep",
    "loader": "lampretrain.bench.loader",
    "balance": "lampretrain.bench.balance",
    "scale": "lampretrain.bench.scale",
    "model": "lampretrain.bench.model_step",
    "train": "lampretrain.bench.train",
    "scaling": "lampretrain.bench.scaling",
    "cost": "lampretrain.bench.cost_fit",
    "cli": "lampretrain.bench.cli_help",
    "nve": "lampretrain.bench.nve",
    "all": "lampretrain.bench.suite",
    "summary": "lampretrain.bench.summary",
}
