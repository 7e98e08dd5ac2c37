"""Host-facing helpers shared by root code on both sides of the socket (cbatchd, the root hooks, admin
tools): resolving a path as a user sees it, finding and tidying a job's cgroups. No policy here."""
