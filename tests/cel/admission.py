"""Evaluates ValidatingAdmissionPolicies the way kube-apiserver does, with a
real CEL implementation (cel-expr-python, the Python binding of Google's
cel-cpp), so a test can check what a policy allows before any cluster runs it.

stdin:  {"runs": [{"policy": VAP, "binding": VAPB, "cases": [{"request", "object", "oldObject"}]}]}
stdout: {"implementation": "cel-expr-python X.Y.Z",
         "runs": [[{"matched", "allowed", "message", "reason"}, ...] or {"error"}, ...]}

What it follows of the apiserver (k8s.io/apiserver/pkg/admission/plugin/policy/validating):
- matchConstraints.resourceRules: apiGroups, apiVersions, operations,
  resources (with "*", "r/sub", "r/*", "*/sub", "*/*"), scope, resourceNames;
- matchConditions: any false skips the policy; an error (and none false)
  applies failurePolicy;
- variables, in order, each seeing the earlier ones as `variables.<name>`;
  one that fails makes every expression that uses it fail;
- validations, all evaluated: the first false or failing one gives the
  message (messageExpression, else message, else "failed expression: ...");
  a failure applies failurePolicy (default Fail);
- the binding's validationActions: the request is refused only with Deny.
The CEL environment is standard CEL plus the strings extension at version 2
(what Kubernetes 1.30 has), with request, object, oldObject, params,
namespaceObject and variables as dynamic values. Kubernetes' own libraries
(authorizer, quantity, ip, url, regex helpers, lists) are not here: an
expression that uses one does not compile, and the run fails. So does a
policy that uses a match feature this script does not implement
(namespaceSelector, objectSelector, excludeResourceRules, paramKind,
binding matchResources or paramRef): nothing is silently ignored.
"""
import json
import re
import sys
from importlib.metadata import version

from cel_expr_python import cel
from cel_expr_python.ext import ext_strings

VARIABLES = ["request", "object", "oldObject", "params", "namespaceObject", "variables"]


class Unsupported(Exception):
    pass


def environment():
    return cel.NewEnv(
        variables={v: cel.Type.DYN for v in VARIABLES},
        extensions=[ext_strings.ExtStrings(version=2)],
    )


def refuse_unsupported(policy, binding):
    spec, bspec = policy.get("spec", {}), binding.get("spec", {})
    mc = spec.get("matchConstraints", {})
    for key in ("namespaceSelector", "objectSelector", "excludeResourceRules"):
        if mc.get(key):
            raise Unsupported(f"matchConstraints.{key}")
    if spec.get("paramKind"):
        raise Unsupported("paramKind")
    if spec.get("auditAnnotations"):
        raise Unsupported("auditAnnotations")
    for key in ("matchResources", "paramRef"):
        if bspec.get(key):
            raise Unsupported(f"binding {key}")
    if bspec.get("policyName") != policy["metadata"]["name"]:
        raise Unsupported("a binding of another policy")


def listed(values, want):
    return "*" in values or want in values


def resource_listed(resources, resource, sub):
    for r in resources:
        if sub:
            base, _, rsub = r.partition("/")
            if rsub and (base in ("*", resource)) and (rsub in ("*", sub)):
                return True
        elif r in ("*", resource):
            return True
    return False


def rule_matches(rule, req):
    res, sub = req["resource"], req.get("subResource", "")
    scope = rule.get("scope", "*")
    namespaced = "namespace" in req
    return (
        listed(rule.get("operations", []), req["operation"])
        and listed(rule.get("apiGroups", []), res["group"])
        and listed(rule.get("apiVersions", []), res["version"])
        and resource_listed(rule.get("resources", []), res["resource"], sub)
        and (scope == "*" or scope == ("Namespaced" if namespaced else "Cluster"))
        and (not rule.get("resourceNames") or req.get("name", "") in rule["resourceNames"])
    )


class Compiled:
    def __init__(self, env, expression):
        self.expression = expression
        self.program = env.compile(expression)
        self.uses = set(re.findall(r"\bvariables\.([A-Za-z_][A-Za-z0-9_]*)", expression))


def evaluate(compiled, data, failed_variables):
    """(value, None) or (None, error text)."""
    broken = compiled.uses & failed_variables.keys()
    if broken:
        name = sorted(broken)[0]
        return None, f"composited variable {name!r} failed: {failed_variables[name]}"
    try:
        value = compiled.program.eval(data=data)
    except Exception as e:  # noqa: BLE001 (an evaluation failure of any kind is the expression's error)
        return None, f"expression {compiled.expression!r} resulted in error: {e}"
    if value.type() == cel.Type.ERROR:
        return None, f"expression {compiled.expression!r} resulted in error: {value.value()}"
    return value.plain_value(), None


def run(policy, binding, cases):
    refuse_unsupported(policy, binding)
    env = environment()
    spec = policy["spec"]
    fail_open = spec.get("failurePolicy", "Fail") == "Ignore"
    rules = spec.get("matchConstraints", {}).get("resourceRules", [])
    conditions = [Compiled(env, c["expression"]) for c in spec.get("matchConditions", [])]
    variables = [(v["name"], Compiled(env, v["expression"])) for v in spec.get("variables", [])]
    validations = [
        (
            Compiled(env, v["expression"]),
            Compiled(env, v["messageExpression"]) if v.get("messageExpression") else None,
            v.get("message", ""),
            v.get("reason", "Invalid"),
        )
        for v in spec.get("validations", [])
    ]
    deny = "Deny" in binding["spec"].get("validationActions", [])
    prefix = (
        f"ValidatingAdmissionPolicy '{policy['metadata']['name']}' with binding "
        f"'{binding['metadata']['name']}' denied request: "
    )
    out = []
    for case in cases:
        req = case["request"]
        data = {
            "request": req,
            "object": case.get("object"),
            "oldObject": case.get("oldObject"),
            "params": None,
            "namespaceObject": case.get("namespaceObject"),
            "variables": {},
        }
        if not any(rule_matches(r, req) for r in rules):
            out.append({"matched": False, "allowed": True, "message": None, "reason": None})
            continue
        errors, skipped = [], False
        for c in conditions:
            value, err = evaluate(c, data, {})
            if err:
                errors.append(err)
            elif value is not True:
                skipped = True
        if skipped or (errors and fail_open):
            out.append({"matched": False, "allowed": True, "message": None, "reason": None})
            continue
        if errors:
            out.append({"matched": True, "allowed": False, "message": prefix + errors[0], "reason": "Forbidden"})
            continue
        bound, failed = {}, {}
        for name, v in variables:
            data["variables"] = dict(bound)
            value, err = evaluate(v, data, failed)
            if err:
                failed[name] = err
            else:
                bound[name] = value
        data["variables"] = bound
        first = None
        for check, message_expr, message, reason in validations:
            value, err = evaluate(check, data, failed)
            if err is None and not isinstance(value, bool):
                err = f"validation expression {check.expression!r} must evaluate to bool"
            if err:
                if not fail_open and first is None:
                    first = (err, "Forbidden")
                continue
            if value:
                continue
            text = None
            if message_expr is not None:
                m, merr = evaluate(message_expr, data, failed)
                if merr is None and isinstance(m, str) and m.strip():
                    text = m
            text = text or message or f"failed expression: {check.expression}"
            if first is None:
                first = (text, reason)
        if first is None or not deny:
            out.append({"matched": True, "allowed": True, "message": None, "reason": None})
        else:
            out.append({"matched": True, "allowed": False, "message": prefix + first[0], "reason": first[1]})
    return out


def main():
    doc = json.load(sys.stdin)
    results = []
    for r in doc["runs"]:
        try:
            results.append(run(r["policy"], r["binding"], r["cases"]))
        except Exception as e:  # noqa: BLE001 (a policy that does not compile, or uses what is not implemented)
            results.append({"error": f"{type(e).__name__}: {e}"})
    json.dump({"implementation": f"cel-expr-python {version('cel-expr-python')}", "runs": results}, sys.stdout)


if __name__ == "__main__":
    main()
