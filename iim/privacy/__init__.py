"""Privacy as data: retention of personal content per tenant, erasure of a subscriber's content, and the
consent purposes the scenario worker enforces (:mod:`iim.scenarios.consent`)."""
