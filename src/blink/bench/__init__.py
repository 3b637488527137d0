"""`blink bench`: a load generator for blink (realtime WebSocket) or any OpenAI-compatible server (SSE).

workload.py  what the simulated users do and when: trace / Poisson arrivals, closed-loop ramps, sessions
clients.py   the drivers that play one session over ws or sse, and its Result
runner.py    drives one or two targets, the progress bar, `main` (called by cli.py)
report.py    the figures (percentiles, ratios) and the report files (NAME.md, NAME.json)
plots.py     NAME.html: the table and inline-SVG plots (latency over time, CDFs)
netem.py     a TCP proxy adding delay, jitter, a bandwidth cap and cuts (a WAN link between edge and core)
"""
