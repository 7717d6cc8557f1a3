"""Prunes HL7's R4 JSON Schema to the definitions the resources carebridge emits reach."""
import json, sys, hashlib
src = sys.argv[1]
raw = open(src, 'rb').read()
s = json.loads(raw)
d = s['definitions']
roots = ["Patient","Observation","Condition","CarePlan","Goal","ServiceRequest","Task","Flag","Consent",
         "HealthcareService","Organization","Location","OperationOutcome"]
def refs(o):
    if isinstance(o, dict):
        for k, v in o.items():
            if k == '$ref': yield v
            else: yield from refs(v)
    elif isinstance(o, list):
        for x in o: yield from refs(x)
def strip(o):
    if isinstance(o, dict):
        return {k: strip(v) for k, v in o.items() if not (k == 'description' and isinstance(v, str))}
    if isinstance(o, list):
        return [strip(x) for x in o]
    return o
seen, stack = set(), list(roots)
while stack:
    n = stack.pop()
    if n in seen or n == 'ResourceList': continue
    seen.add(n)
    stack.extend(r.split('/')[-1] for r in refs(d[n]))
defs = {k: strip(d[k]) for k in sorted(seen)}
# `contained` resources are never emitted: any object passes there.
defs['ResourceList'] = {}
out = {"$schema": s['$schema'], "id": s['id'],
       "description": "Pruned from HL7 FHIR R4 4.0.1 fhir.schema.json (sha256 %s): the definitions reachable from %s; descriptions removed; ResourceList (contained) accepts any object." % (hashlib.sha256(raw).hexdigest(), ", ".join(roots)),
       "definitions": defs}
json.dump(out, open(sys.argv[2], 'w'), separators=(',', ':'), sort_keys=True)
print(len(defs))
