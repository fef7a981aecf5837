"""What is checked before an engine sees a request, and what a failure says about
it afterwards. `gate.Admission` is the one hook the relay calls; behind it the field
policy SGLang itself applies (`policy`), the size limits and the streaming prompt
scanner that counts a prompt while its body arrives (`limits`, `prompt_scan`),
refusal of new work while the primary is saturated (`shedding`) and the
query-of-death quarantine (`quarantine`). A refusal here is the client's answer
(4xx/429), never a node fault."""
