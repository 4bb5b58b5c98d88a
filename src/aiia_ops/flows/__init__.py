"""One module per procedure: read facts through a real runner, plan with commands/, then
act through a runner that may be the dry-run printer."""
