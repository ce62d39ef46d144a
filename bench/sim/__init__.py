"""The cluster simulator behind ``splitserve simulate`` (entry point: ``bench.simulator``).

latency.py   step latency models: fitted to `bench profile` (CPU), roofline (GPU)
hardware.py  GPU datasheet numbers, model shapes
host.py      a CPU host's cores shared by workers and other work: modelled and measured
workload.py  arrivals and lengths, drawn or from a trace file
cluster.py   the discrete-event simulation of router + prefill pool + decode pool
search.py    goodput (highest rate at >= 90% SLO attainment) and the prefill:decode split search
validate.py  simulated vs measured `bench compare` runs
transfer.py  exposed KV transfer at GPU scale, layer-wise vs whole-request push
"""
