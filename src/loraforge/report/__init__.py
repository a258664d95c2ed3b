"""Run reports: `report.html` with the config, dataset, loss curve and preview grids of a run.

Nothing is imported here, so `loraforge --help` stays fast: use `loraforge.report.html`
(`write_report`, `read_history`), `loraforge.report.chart` (`loss_chart`) and
`loraforge.report.command` (`report_command`).
"""
