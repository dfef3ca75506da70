"""Differential privacy for the released histograms: settings, accounting and noise.

Each module has one job: `settings` is the wire term every site checks, `accounting` turns
(ε, δ, releases) into a noise scale and back with OpenDP's zCDP maps, `noise` draws the exact
discrete Gaussian a site adds before SecAgg+ masks its vector.
"""
