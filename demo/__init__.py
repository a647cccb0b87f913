"""`python -m demo` (`make demo`): segment a real CT through a local Triton server on the CPU.

The demo sits above both halves of the project: it starts the server side (`wholebody`: the bundle,
the local `tritonserver` launcher) and runs the client side (`client`) against it. Nothing imports it,
so `wholebody` (plain functions, the ground floor) never imports the client, and `client` (installable
without torch or MONAI) never needs the server's dependencies.
"""
