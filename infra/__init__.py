"""minitwit-ha: the Pulumi program's building blocks. Importing does nothing; callers decide."""
