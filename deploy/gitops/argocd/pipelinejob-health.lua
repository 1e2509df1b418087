-- Argo CD health of a conveyor.dev PipelineJob, from its conditions (positive polarity, each with
-- observedGeneration): Stalled=True is Degraded; Reconciling=True is Progressing even while Ready (a serve
-- fleet rolling to a new spec or draining a scale-down keeps serving); Ready=True is Healthy; suspended is
-- Suspended; anything else (no status yet, a stale status) is Progressing. Without this script Argo CD
-- would count a PipelineJob as Healthy the moment it exists.
local hs = {}
if obj.spec ~= nil and obj.spec.suspend == true then
  hs.status = "Suspended"
  hs.message = "spec.suspend is true: pods are stopped, state is kept"
  return hs
end
if obj.status == nil or obj.status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Conveyor operator to report status"
  return hs
end
local generation = obj.metadata.generation
if generation ~= nil and obj.status.observedGeneration ~= nil and obj.status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end
local ready = nil
local stalled = nil
local reconciling = nil
for _, condition in ipairs(obj.status.conditions) do
  if generation ~= nil and condition.observedGeneration ~= nil and condition.observedGeneration < generation then
    hs.status = "Progressing"
    hs.message = "Waiting for the operator to observe generation " .. generation
    return hs
  end
  if condition.type == "Ready" then
    ready = condition
  elseif condition.type == "Stalled" then
    stalled = condition
  elseif condition.type == "Reconciling" then
    reconciling = condition
  end
end
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = (stalled.reason or "Stalled") .. ": " .. (stalled.message or "")
  return hs
end
if reconciling ~= nil and reconciling.status == "True" then
  hs.status = "Progressing"
  hs.message = (reconciling.reason or "Reconciling") .. ": " .. (reconciling.message or "")
  return hs
end
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = (ready.reason or "Ready") .. ": " .. (ready.message or "")
  return hs
end
hs.status = "Progressing"
if ready ~= nil then
  hs.message = (ready.reason or "NotReady") .. ": " .. (ready.message or "")
else
  hs.message = "No Ready condition yet"
end
return hs
