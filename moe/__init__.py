"""The MoE layer: routers, ordering, dispatch/combine, experts and the overlap schedule."""
