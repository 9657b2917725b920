"""Load balancers: backend weights from measured load, and connection draining.

- :mod:`cloudmon.lb.base` - the :class:`~cloudmon.lb.base.Drainer` protocol shared by
  auto-scaling (drain before terminate) and rebalancing (drain before migrate);
- :mod:`cloudmon.lb.haproxy` - HAProxy's runtime API (admin socket) client and parsers;
- :mod:`cloudmon.lb.weights` - pure weight formulas (weighted by CPU headroom, least
  outstanding requests), hysteresis and slow start;
- :mod:`cloudmon.lb.service` - :class:`~cloudmon.lb.service.ServiceGroup` documents, the
  weight controller and :class:`~cloudmon.lb.service.LoadBalancerService`;
- :mod:`cloudmon.lb.drain` - :class:`~cloudmon.lb.drain.HaproxyDrainer` and
  :class:`~cloudmon.lb.drain.TimeoutDrainer`.
"""
