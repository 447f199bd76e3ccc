"""Open-loop load generator for the HyTRec service: ``hytrec loadtest`` (or ``python -m hytrec.loadtest``).

Modules: ``workload`` (what and when to send), ``wire`` (raw keep-alive HTTP/1.1), ``engine`` (the open-loop
schedule and its processes), ``report`` (merge, table, plot), ``hello`` (the calibration endpoint),
``commands`` (the CLI).
"""
