"""Small helpers shared by the four algorithm scripts.

Only infrastructure lives here (task registry, dataset loading, environment construction, seeding, atomic
checkpoint writes, user-error handling). Algorithm code stays in the top-level scripts, so that each script can be
read next to its paper and copied into another project together with this folder.
"""
