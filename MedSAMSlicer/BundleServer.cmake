# The MedSAM server package, carried by the extension: the first Segment pip-installs it from this folder
# (MedSAMSlicerLib/install.py), since no package index holds it. Set before including:
#   MEDSAM_SERVER_SOURCE_DIR    the repository's server/ folder (pyproject.toml + medsam_server/)
#   MEDSAM_SERVER_DESTINATION   where it goes in the extension package: MedSAMServer/ next to MedSAMSlicer.py
#   MEDSAM_SERVER_BUILD_DIR     the same place in the build tree (optional), for Slicer run from the build
set(_medsam_server_excludes
  PATTERN "tests" EXCLUDE
  PATTERN "__pycache__" EXCLUDE
  PATTERN "*.pyc" EXCLUDE
  PATTERN "*.egg-info" EXCLUDE
  )
if(MEDSAM_SERVER_BUILD_DIR)
  file(COPY "${MEDSAM_SERVER_SOURCE_DIR}/" DESTINATION "${MEDSAM_SERVER_BUILD_DIR}" ${_medsam_server_excludes})
endif()
install(DIRECTORY "${MEDSAM_SERVER_SOURCE_DIR}/"
  DESTINATION "${MEDSAM_SERVER_DESTINATION}"
  COMPONENT RuntimeLibraries
  ${_medsam_server_excludes}
  )
