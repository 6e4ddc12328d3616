"""The parameter report: counts of the TinT as stored and of its standard view dense, and their rendering."""
