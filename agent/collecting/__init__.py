"""Collecting: each dimension's reading through its collector, turned into the value its hour
receives (`sampling`), one read in flight per dimension with its deadline (`reads`)."""
