"""What a run shows, one job per module: identity (which tracker, who the W&B run is), metrics
(the keys and what is logged under them), tracking (what the training loop calls), artifacts
(the best model on W&B), masks (RSC's mask images), meter (step metrics without per-step host
syncs) and report (results.json and the console accuracy table)."""
