"""The pbs_mom emulator behind ``cbatch local`` and the tests. The runtime never imports it."""
