"""One module per benchmark scenario, each holding both halves of it: the load-generator side
(`scen_<name>`, run inside `python -m bench.loadgen <name>`) and the coordinator side (`run_scenario`,
called by `bench.run` with its `Bench`), with the scenario's sizes, targets, table rows and plot."""

ORDER = ("ttft", "idle", "throughput", "crash", "storm", "openloop")
