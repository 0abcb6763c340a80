//! pf-goblins: processes that speak only through stdin, stdout and stderr.
