"""Sans-IO SIP layer: message parsing/serialisation, URIs, transactions."""
