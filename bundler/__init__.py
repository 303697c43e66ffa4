"""The build station: bundle spec, wheel/model collection, manifest, signing, packing.

Never imports `appliance`, torch or Textual: a build station has no GPU stack.
"""
