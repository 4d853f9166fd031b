"""Generation jobs: admission, running, settlement, the reaper and the GPU worker."""
