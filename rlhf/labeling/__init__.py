"""Human labeling: a web app where annotators compare two responses, with overlap, gold and majority votes.

Modules: db (tables, engine, migrations), accounts (invites, passwords, sessions), campaigns (queues
and votes), aggregate (majority, agreement, kappa, gold: pure functions), results (figures and the
export as comparisons), app (the FastAPI pages), cli (`python -m rlhf.labeling`).
"""
