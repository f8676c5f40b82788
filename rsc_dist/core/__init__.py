"""What every part of rsc_dist shares and nothing below it: config field declarations, the
contracts with other programs (exit codes, files, the results.json layout), the seed mixer, the
model-selection rules over evaluation records. Imports nothing else of rsc_dist."""
