"""Job chains: one YAML file names the stages of a study (jobs and steps such as tokenize or generate), how they
depend on each other and which outputs feed which; `hepml chain validate/run/status` check, run and report it."""
